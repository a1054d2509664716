"""Call an engine's own ASGI app in-process and stream its answer as :class:`EngineChunk`.

vLLM's OpenAI server is a FastAPI app over an ``EngineClient``; a ModelServer replica builds that
app over its own AsyncLLM and calls it here, without a socket. What this adds:

* **Batching that spares the first token.** The first body pieces are yielded as soon as the
  app sends them, with whatever it sent in the same step (chat sends its role chunk and the first
  token together), and so is every later piece of a stream until one carries output text
  (:func:`carries_output`: the first token's text can come a step after the role chunk, when the
  detokenizer holds back an incomplete character), so time to first token is untouched: a fixed
  flush timer would add its length to every first token. After that, each chunk gathers what
  the app sends within the batch interval of the piece that opens it, plus whatever piled up
  while the consumer was busy, and goes out the moment the answer ends. Every chunk costs a
  crossing of Ray Serve's transport (replica to gateway, gateway to client), so fewer, larger
  chunks are what keeps the relay's CPU near the engine's own server. The interval is asked for
  each chunk: a replica lengthens it as its streams grow (:func:`batch_interval_s`), so its chunk
  rate, not its batch, sets the relay's CPU; with few streams chunks stay short.
* **Usage from the engine.** :class:`UsageMeter` is put in a context variable that the app's
  tasks inherit; the engine client's ``generate``/``encode`` add what the engine reports
  (prompt tokens, prefix-cached tokens, generated tokens of every choice), so every chunk carries
  the request's usage so far, whatever the endpoint, and an aborted stream is billed for what ran.
* **Abort on close.** Closing the generator cancels the app's task; vLLM aborts the request in
  the engine when its ``generate`` is cancelled.
* **No server internals to tenants.** A 5xx answer of the app, or an app that ends without one,
  becomes :class:`EngineUnavailableError` with a generic message naming the request id; the
  body excerpt or the exception goes to this process's log under that id, never to the client
  (it can hold stack details, paths or another request's data).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from moestack.engine.protocol import EngineChunk, EngineRequest
from moestack.errors import EngineUnavailableError
from moestack.usage import Usage

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


class UsageMeter:
    """Tokens one request used so far, summed over its prompts and choices."""

    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")

    def __init__(self) -> None:
        self.prompt_tokens = self.completion_tokens = self.cached_prompt_tokens = 0

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_prompt_tokens)


current_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar(
    "moestack_usage_meter", default=None)

_DONE = object()


def _scope(request: EngineRequest) -> dict[str, Any]:
    path = request.path
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(request.body)).encode()),
                    (b"x-request-id", request.request_id.encode())],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
    }


_TEXT_FIELDS = frozenset({"content", "text", "delta", "reasoning_content", "reasoning",
                          "arguments", "partial_json", "thinking"})
"""Where the streamed events of vLLM's routes put output: chat's ``delta.content`` (and its
reasoning and tool-call ``arguments``), completions' ``text``, the Responses API's ``delta``,
Anthropic's ``text``/``partial_json``/``thinking`` deltas."""


def carries_output(data: bytes) -> bool:
    """Whether a piece of an event stream carries generated output: a non-empty string in an
    output field (:data:`_TEXT_FIELDS`) or a tool call, not only a role or an envelope."""
    for line in data.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload and payload != b"[DONE]":
            try:
                if _has_output(json.loads(payload)):
                    return True
            except ValueError:
                continue
    return False


def _has_output(node: Any) -> bool:
    if isinstance(node, dict):
        return any((k in _TEXT_FIELDS and isinstance(v, str) and v != "")
                   or (k == "tool_calls" and bool(v)) or _has_output(v)
                   for k, v in node.items())
    if isinstance(node, list):
        return any(_has_output(v) for v in node)
    return False


def batch_interval_s(streams: int, min_s: float, max_s: float, chunks_per_s: float) -> float:
    """How long a stream's chunk gathers when the replica has ``streams`` open: enough that
    they send about ``chunks_per_s`` chunks a second together, within ``[min_s, max_s]``."""
    return min(max(streams / chunks_per_s, min_s), max_s)


async def serve_asgi(app: ASGIApp, request: EngineRequest,
                     interval_s: Callable[[], float] = lambda: 0.0
                     ) -> AsyncIterator[EngineChunk]:
    """Run ``request`` through ``app``; ``interval_s()`` gives each chunk's gathering time, in
    seconds (see the module docstring)."""
    meter = UsageMeter()
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.put_nowait(message)

    token = current_meter.set(meter)
    try:  # the task copies the context now: the app's tasks all see this request's meter
        task = asyncio.get_running_loop().create_task(app(_scope(request), receive, send))
    finally:
        current_meter.reset(token)
    task.add_done_callback(lambda _t: messages.put_nowait(_DONE))
    try:
        start = await messages.get()
        if start is _DONE:
            log.error("request %s: the engine's server gave no answer: %s", request.request_id,
                      _why(task))
            raise engine_failed(request.request_id)
        status = start["status"]
        content_type = next((v.decode("latin-1") for k, v in start.get("headers", ())
                             if k.lower() == b"content-type"), "application/json")
        # With what the app sent in the same step (chat's role chunk comes with the first token).
        first, more = await _chunk(messages, 0.0)
        if status >= 500:
            log.error("request %s: the engine answered %d: %s", request.request_id, status,
                      first[:300].decode("utf-8", "replace"))
            raise engine_failed(request.request_id)
        yield EngineChunk(first, meter.usage(), status, content_type)
        eager = content_type.startswith("text/event-stream") and not carries_output(first)
        while more:
            data, more = await _chunk(messages, 0.0 if eager else interval_s())
            eager = eager and not carries_output(data)
            yield EngineChunk(data, meter.usage())
    finally:
        if not task.done():
            gone.set()
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def engine_failed(request_id: str) -> EngineUnavailableError:
    """What a tenant is told when the engine failed on its request: nothing of the failure."""
    return EngineUnavailableError(f"The model's engine failed on this request (request id "
                                  f"{request_id}); retry, and quote the id if it persists.")


async def _chunk(messages: asyncio.Queue, interval_s: float) -> tuple[bytes, bool]:
    """The next body piece with what arrives within ``interval_s`` of it (and what is queued
    already), and whether more body follows."""
    data, more = await _body(messages)
    parts = [data]
    more = await _gather(messages, parts, more, interval_s)
    return b"".join(parts), more


async def _body(messages: asyncio.Queue) -> tuple[bytes, bool]:
    """The next body piece and whether more follow (skips empty pieces)."""
    while True:
        data, more = _piece(await messages.get())
        if data or not more:
            return data, more


async def _gather(messages: asyncio.Queue, parts: list[bytes], more: bool,
                  interval_s: float) -> bool:
    """Add to ``parts`` what arrives within ``interval_s`` (and what is queued already); returns
    whether more body follows."""
    loop = asyncio.get_running_loop()
    end = loop.time() + interval_s
    while more:
        while more and not messages.empty():
            data, more = _piece(messages.get_nowait())
            parts.append(data)
        left = end - loop.time()
        if not more or left <= 0:
            break
        try:
            data, more = _piece(await asyncio.wait_for(messages.get(), left))
        except asyncio.TimeoutError:
            break
        parts.append(data)
    return more


def _piece(message: Any) -> tuple[bytes, bool]:
    if message is _DONE:
        return b"", False
    if message.get("type") != "http.response.body":
        return b"", True
    return message.get("body", b""), message.get("more_body", False)


def _why(task: asyncio.Task) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"{type(exc).__name__}: {exc}" if exc else "no response"


def metered(generate: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap an engine client's ``generate``/``encode`` so outputs count in the request's meter.

    Outputs are vLLM ``RequestOutput``/``PoolingRequestOutput``: prompt tokens and cached tokens
    are counted once per engine request (list prompts are one engine request each), generated
    tokens per choice (``n`` choices are one engine request), whether outputs are deltas or
    cumulative (``CUMULATIVE``/``FINAL_ONLY``, told by each output's growing token list).
    """

    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        meter = current_meter.get()
        stream = generate(*args, **kwargs)
        if meter is None:
            async for out in stream:
                yield out
            return
        prompt_seen, cached_seen, tokens_seen = False, 0, {}
        delta = _is_delta(args, kwargs)
        try:
            async for out in stream:
                if not prompt_seen and getattr(out, "prompt_token_ids", None) is not None:
                    prompt_seen = True
                    meter.prompt_tokens += len(out.prompt_token_ids)
                cached = getattr(out, "num_cached_tokens", None) or 0
                if cached > cached_seen:
                    meter.cached_prompt_tokens += cached - cached_seen
                    cached_seen = cached
                for o in getattr(out, "outputs", None) or ():
                    n = len(getattr(o, "token_ids", None) or ())
                    if delta:
                        meter.completion_tokens += n
                    else:
                        index = getattr(o, "index", 0)
                        meter.completion_tokens += max(0, n - tokens_seen.get(index, 0))
                        tokens_seen[index] = max(n, tokens_seen.get(index, 0))
                yield out
        finally:
            await stream.aclose()

    return wrapper


def _is_delta(args: tuple, kwargs: dict) -> bool:
    params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
    kind = getattr(params, "output_kind", None)
    return getattr(kind, "name", None) == "DELTA"
