"""Stop work whose client has gone before a non-streamed response is ready.

A streamed response notices a gone client when it writes; a non-streamed one would otherwise
generate to the end and bill it as a completed request. ``cancel_on_disconnect`` races the work
against the ASGI ``http.disconnect`` message and cancels the work when the client leaves first,
so the engine request is aborted and the usage is recorded as 499 with what was generated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from moestack.api.generation import CLIENT_CLOSED

T = TypeVar("T")

POLL_INTERVAL_S = 0.1


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        # The body was read already; a server that keeps answering must not make this spin.
        await asyncio.sleep(POLL_INTERVAL_S)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """The result of ``work``, or a bare 499 response if the client disconnected first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return Response(status_code=CLIENT_CLOSED)


async def respond(request: Request, work: Awaitable[BaseModel | AsyncIterator[str]],
                  stream: bool) -> Response:
    """The HTTP response of a serving call: server-sent events for a stream, else JSON (or 499
    if the client left before it was ready)."""
    result = await (work if stream else cancel_on_disconnect(request, work))
    if isinstance(result, Response):  # the client left before the response was ready
        return result
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump(exclude_none=True))
