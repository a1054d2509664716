"""Notice a client that leaves before its answer is ready.

A streamed answer notices a gone client when it writes; before the first byte, and for a
non-streamed answer, the gateway would otherwise wait for the engine (and bill the work) for
nobody. :func:`until_disconnected` returns when the ASGI ``http.disconnect`` message arrives, so
the relay can race it against the engine and cancel the engine request (which aborts it).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

POLL_INTERVAL_S = 0.1


async def until_disconnected(request: Request) -> None:
    """Return once the client has disconnected (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        # A server that keeps answering must not make this spin.
        await asyncio.sleep(POLL_INTERVAL_S)
