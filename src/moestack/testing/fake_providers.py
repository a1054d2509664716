"""Fake external providers on loopback: an OpenAI-compatible API and an Anthropic Messages API,
real HTTP servers (uvicorn in a thread), for overflow tests and benchmarks.

Each checks the API key the gateway sends, counts prompt tokens as the words of the prompt and
generates ``max_tokens`` words (at most ``FakeProvider.max_output_tokens``), one per
``token_interval_s``, streamed or whole, with usage as the real APIs report it (an OpenAI stream
reports usage only when ``stream_options.include_usage`` asks for it). Errors are injected with
:meth:`FakeProvider.fail_next`. Every request is kept (:attr:`FakeProvider.seen`: body and
headers); a client that leaves mid-stream is noticed (:attr:`FakeProvider.cancelled`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moestack.net import free_port


@dataclass
class Seen:
    path: str
    body: dict
    headers: dict[str, str]


@dataclass
class FakeProvider:
    """State and knobs of one fake provider (change them while it runs)."""

    kind: str
    """``openai`` or ``anthropic``."""
    api_key: str
    token_interval_s: float = 0.0
    ttft_s: float = 0.0
    max_output_tokens: int = 1 << 20
    seen: list[Seen] = field(default_factory=list)
    cancelled: int = 0
    """Streams the client left before their end."""
    completed: int = 0
    _failures: list[tuple[int, str]] = field(default_factory=list)
    port: int = 0

    @property
    def base_url(self) -> str:
        """The API root, version path included (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, status: int, message: str = "injected provider failure",
                  times: int = 1) -> None:
        """Answer the next ``times`` requests with ``status`` and an error body of the kind's
        shape."""
        self._failures.extend([(status, message)] * times)


def _words(value) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for v in value for w in _words(v)]
    if isinstance(value, dict):
        return _words(value.get("content") if "content" in value else value.get("text", ""))
    return []


def _sse(payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def build_app(p: FakeProvider) -> Starlette:
    async def handle(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if p.kind == "anthropic":
            ok = headers.get("x-api-key") == p.api_key
        else:
            ok = headers.get("authorization") == f"Bearer {p.api_key}"
        body = await request.json()
        p.seen.append(Seen(request.url.path, body, headers))
        if not ok:
            return _error(p, 401, "invalid api key")
        if p._failures:
            status, message = p._failures.pop(0)
            return _error(p, status, message)
        chat = request.url.path.endswith("/chat/completions")
        prompt = (_words(body.get("messages")) + _words(body.get("system"))
                  if "messages" in body else _words(body.get("prompt")))
        budget = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        out = [f"w{i}" for i in range(min(int(budget), p.max_output_tokens))]
        if body.get("stream"):
            gen = (_anthropic_stream if p.kind == "anthropic" else _openai_stream)(
                p, body, chat, len(prompt), out)
            return StreamingResponse(_watch(p, gen), media_type="text/event-stream")
        await asyncio.sleep(p.ttft_s + p.token_interval_s * len(out))
        p.completed += 1
        return JSONResponse(_anthropic_whole(body, len(prompt), out) if p.kind == "anthropic"
                            else _openai_whole(body, chat, len(prompt), out))

    paths = ["/v1/messages"] if p.kind == "anthropic" else ["/v1/chat/completions",
                                                            "/v1/completions"]
    return Starlette(routes=[Route(path, handle, methods=["POST"]) for path in paths])


def _error(p: FakeProvider, status: int, message: str) -> JSONResponse:
    if p.kind == "anthropic":
        return JSONResponse({"type": "error", "error": {"type": "api_error",
                                                        "message": message}}, status)
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                   "code": None}}, status)


async def _watch(p: FakeProvider, gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for piece in gen:
            yield piece
        p.completed += 1
    except (asyncio.CancelledError, GeneratorExit):
        p.cancelled += 1
        raise


def _openai_whole(body: dict, chat: bool, prompt: int, out: list[str]) -> dict:
    text = " ".join(out)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "finish_reason": "length"} if chat else
              {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
    return {"id": "fake-1", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body["model"], "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(out),
                      "total_tokens": prompt + len(out)}}


async def _openai_stream(p: FakeProvider, body: dict, chat: bool, prompt: int,
                         out: list[str]) -> AsyncIterator[bytes]:
    base = {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": body["model"]}
    await asyncio.sleep(p.ttft_s)
    for i, word in enumerate(out):
        last = i == len(out) - 1
        choice = ({"index": 0, "delta": {"content": word + " "}, "finish_reason":
                   "length" if last else None} if chat else
                  {"index": 0, "text": word + " ", "finish_reason": "length" if last else None})
        yield _sse({**base, "choices": [choice]})
        await asyncio.sleep(p.token_interval_s)
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": len(out),
            "total_tokens": prompt + len(out)}})
    yield b"data: [DONE]\n\n"


def _anthropic_whole(body: dict, prompt: int, out: list[str]) -> dict:
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": " ".join(out)}], "stop_reason": "max_tokens",
            "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": len(out)}}


async def _anthropic_stream(p: FakeProvider, body: dict, chat: bool, prompt: int,
                            out: list[str]) -> AsyncIterator[bytes]:
    await asyncio.sleep(p.ttft_s)
    yield _sse({"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": 1}}}, "message_start")
    yield _sse({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}, "content_block_start")
    for word in out:
        yield _sse({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": word + " "}}, "content_block_delta")
        await asyncio.sleep(p.token_interval_s)
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    yield _sse({"type": "message_delta", "delta": {"stop_reason": "max_tokens",
                                                   "stop_sequence": None},
                "usage": {"output_tokens": len(out)}}, "message_delta")
    yield _sse({"type": "message_stop"}, "message_stop")


@contextmanager
def serve_fake_provider(kind: str, api_key: str = "sk-fake-provider",
                        **knobs) -> Iterator[FakeProvider]:
    """A fake provider of ``kind`` (``openai`` | ``anthropic``) on a free loopback port."""
    import uvicorn

    p = FakeProvider(kind, api_key, port=free_port(), **knobs)
    server = uvicorn.Server(uvicorn.Config(build_app(p), host="127.0.0.1", port=p.port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()),
                              name=f"fake-{kind}-provider", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the fake provider did not start")
        thread.join(0.02)
    try:
        yield p
    finally:
        server.should_exit = True
        thread.join(10)


def main(argv: list[str] | None = None) -> int:
    """``python -m moestack.testing.fake_providers``: one fake provider in its own process."""
    import argparse
    import os

    import uvicorn

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--kind", choices=("openai", "anthropic"), default="openai")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key-env", required=True, help="environment variable holding the key "
                   "the provider accepts")
    p.add_argument("--ttft-s", type=float, default=0.0)
    p.add_argument("--token-interval-s", type=float, default=0.0)
    args = p.parse_args(argv)
    provider = FakeProvider(args.kind, os.environ[args.api_key_env], args.token_interval_s,
                            args.ttft_s, port=args.port)
    uvicorn.run(build_app(provider), host="127.0.0.1", port=args.port, log_level="warning",
                lifespan="off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
