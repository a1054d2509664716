"""moestack.engine.asgi: the first token goes at once, later pieces batch (longer on a busy
replica), closing aborts."""

from __future__ import annotations

import asyncio
import json

import pytest

from moestack.engine.asgi import batch_interval_s, carries_output, serve_asgi
from moestack.engine.protocol import EngineRequest

REQUEST = EngineRequest(request_id="r1", path="/v1/chat/completions", body=b"{}")


def sse(*names: str) -> bytes:
    """vLLM chat stream events: ``role`` (the role chunk, no text), ``tN`` (token text tN),
    ``empty`` (a token whose text is held back), ``[DONE]``."""
    def event(name: str) -> str:
        if name == "[DONE]":
            return "[DONE]"
        delta = {"role": "assistant", "content": ""} if name == "role" else \
            {"content": "" if name == "empty" else name}
        return json.dumps({"object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    return b"".join(f"data: {event(n)}\n\n".encode() for n in names)


def piece(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def streaming_app(log: list[str], gaps_s: list[float], first: tuple[str, ...] = ("role", "t0")):
    """Like vLLM's chat stream: role chunk and first token in one step, then token pieces."""

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        try:
            for name in first:
                await send(piece(sse(name)))
            for i, gap in enumerate(gaps_s, start=1):
                await asyncio.sleep(gap)
                await send(piece(sse(f"t{i}")))
            await send(piece(sse("[DONE]"), more=False))
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    return app


async def collect(app, interval_s: float) -> list:
    return [c async for c in serve_asgi(app, REQUEST, lambda: interval_s)]


def test_first_chunk_carries_the_first_token_without_waiting_for_the_batch():
    chunks = asyncio.run(collect(streaming_app([], [0.002] * 3), interval_s=0.5))
    assert chunks[0].data == sse("role", "t0")
    assert chunks[0].status == 200 and chunks[0].content_type == "text/event-stream"
    # the rest arrive within one interval: one batch, ending when the answer ends
    assert [c.data for c in chunks[1:]] == [sse("t1", "t2", "t3", "[DONE]")]


def test_pieces_apart_by_more_than_the_interval_go_in_separate_chunks():
    chunks = asyncio.run(collect(streaming_app([], [0.15, 0.15]), interval_s=0.02))
    assert [c.data for c in chunks] == [sse("role", "t0"), sse("t1"), sse("t2", "[DONE]")]


def test_closing_the_stream_cancels_the_app():
    log: list[str] = []

    async def run():
        stream = serve_asgi(streaming_app(log, [10.0]), REQUEST, lambda: 0.01)
        first = await anext(stream)
        await stream.aclose()
        return first

    first = asyncio.run(run())
    assert first.data == sse("role", "t0")
    assert log == ["cancelled"]


def test_each_chunk_gathers_for_the_interval_asked_when_it_opens():
    intervals = iter([0.1, 0.0, 0.0])  # the replica was busy, then quiet

    async def run():
        app = streaming_app([], [0.01, 0.01, 0.2, 0.01])
        return [c.data async for c in serve_asgi(app, REQUEST, lambda: next(intervals))]

    # 0.1 s gathers t1 and t2; at 0 s, t3 goes alone although t4 follows 10 ms later
    assert asyncio.run(run()) == [sse("role", "t0"), sse("t1", "t2"), sse("t3"),
                                  sse("t4", "[DONE]")]


@pytest.mark.parametrize(("streams", "expected_s"), [
    (0, 0.03), (1, 0.03), (4, 0.03), (15, 0.1), (30, 0.15), (300, 0.15)])
def test_a_busier_replica_gathers_longer_within_bounds(streams, expected_s):
    assert batch_interval_s(streams, 0.03, 0.15, chunks_per_s=150) == pytest.approx(expected_s)


def test_pieces_go_at_once_until_one_carries_text():
    # The first token's text was held back: the role chunk goes alone, and the token that
    # completes it a step later must not wait for a batch either.
    app = streaming_app([], [0.05, 0.01, 0.01], first=("role", "empty"))
    chunks = asyncio.run(collect(app, interval_s=0.5))
    assert [c.data for c in chunks] == [sse("role", "empty"), sse("t1"),
                                        sse("t2", "t3", "[DONE]")]


def events(*payloads: dict) -> bytes:
    return b"".join(f"data: {json.dumps(p)}\n\n".encode() for p in payloads)


@pytest.mark.parametrize(("data", "carries"), [
    (sse("role"), False), (sse("role", "empty"), False), (sse("[DONE]"), False),
    (sse("role", "t0"), True),
    (events({"choices": [{"delta": {"reasoning_content": "hm"}}]}), True),
    (events({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
        "name": "get_weather", "arguments": ""}}]}}]}), True),
    (events({"object": "text_completion", "choices": [{"text": ""}]}), False),
    (events({"object": "text_completion", "choices": [{"text": "Hi"}]}), True),
    (events({"type": "response.created", "response": {"output": [], "text": {
        "format": {"type": "text"}}}}), False),
    (events({"type": "response.output_text.delta", "delta": "Hi"}), True),
    (b"event: message_start\n" + events({"type": "message_start", "message": {
        "content": [], "role": "assistant"}}), False),
    (events({"type": "content_block_start", "content_block": {"type": "text", "text": ""}}),
     False),
    (events({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}),
     True),
    (b"data: {not json\n\n", False),
])
def test_which_stream_pieces_carry_output(data, carries):
    assert carries_output(data) is carries
