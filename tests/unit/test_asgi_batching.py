"""moestack.engine.asgi: the first token goes at once, later pieces batch, closing aborts."""

from __future__ import annotations

import asyncio

from moestack.engine.asgi import serve_asgi
from moestack.engine.protocol import EngineRequest

REQUEST = EngineRequest(request_id="r1", path="/v1/chat/completions", body=b"{}")


def piece(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def streaming_app(log: list[str], gaps_s: list[float]):
    """Like vLLM's chat stream: role chunk and first token in one step, then token pieces."""

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        try:
            await send(piece(b"role;"))
            await send(piece(b"t0;"))
            for i, gap in enumerate(gaps_s, start=1):
                await asyncio.sleep(gap)
                await send(piece(f"t{i};".encode()))
            await send(piece(b"[DONE]", more=False))
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    return app


async def collect(app, interval_s: float) -> list:
    return [c async for c in serve_asgi(app, REQUEST, interval_s)]


def test_first_chunk_carries_the_first_token_without_waiting_for_the_batch():
    chunks = asyncio.run(collect(streaming_app([], [0.002] * 3), interval_s=0.5))
    assert chunks[0].data == b"role;t0;"
    assert chunks[0].status == 200 and chunks[0].content_type == "text/event-stream"
    # the rest arrive within one interval: one batch, ending when the answer ends
    assert [c.data for c in chunks[1:]] == [b"t1;t2;t3;[DONE]"]


def test_pieces_apart_by_more_than_the_interval_go_in_separate_chunks():
    chunks = asyncio.run(collect(streaming_app([], [0.15, 0.15]), interval_s=0.02))
    assert [c.data for c in chunks] == [b"role;t0;", b"t1;", b"t2;[DONE]"]


def test_closing_the_stream_cancels_the_app():
    log: list[str] = []

    async def run():
        stream = serve_asgi(streaming_app(log, [10.0]), REQUEST, 0.01)
        first = await anext(stream)
        await stream.aclose()
        return first

    first = asyncio.run(run())
    assert first.data == b"role;t0;"
    assert log == ["cancelled"]
