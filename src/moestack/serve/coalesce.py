"""Chunks an engine produced together leave the replica together.

Every item a Ray Serve streaming call yields costs both ends a Ray object (serialize, report,
fetch, deserialize) and the gateway one relay step: about half a millisecond of CPU per item on
each side, whatever its size. An engine that produces several chunks at once (the fake engine's
whole answer, vLLM's batcher catching up after a busy step) would pay that per chunk.
:func:`coalesce` runs the engine's stream in a task of its own and yields, each time, the chunk
that arrived first merged with every chunk already queued behind it: never waiting for more (the
first token leaves as soon as it exists), never reordering, an engine error raised after the
chunks before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from moestack.engine.protocol import EngineChunk

_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def merge(chunks: list[EngineChunk]) -> EngineChunk:
    """One chunk carrying ``chunks`` in order: their data and token ids joined, the last one's
    usage (usage is cumulative), the first one's status, content type and prompt ids (set on a
    stream's first chunk only)."""
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    return dataclasses.replace(
        first, data=b"".join(c.data for c in chunks), usage=chunks[-1].usage,
        token_ids=tuple(t for c in chunks for t in c.token_ids))


async def coalesce(chunks: AsyncIterator[EngineChunk]) -> AsyncIterator[EngineChunk]:
    """``chunks``, each item merged with those already produced behind it (module docstring)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        except Exception as exc:  # the engine's error reaches the caller after its chunks
            queue.put_nowait(_Failed(exc))
        finally:
            queue.put_nowait(_END)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            item = await queue.get()
            batch: list[EngineChunk] = []
            while isinstance(item, EngineChunk):
                batch.append(item)
                if queue.empty():
                    item = None
                    break
                item = queue.get_nowait()
            if batch:
                yield merge(batch)
            if isinstance(item, _Failed):
                raise item.exc
            if item is _END:
                return
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
