"""Chunks an engine produces together leave the replica as one Ray item
(:mod:`moestack.serve.coalesce`), without delaying the first or reordering any."""

from __future__ import annotations

import asyncio

import pytest

from moestack.engine.protocol import EngineChunk
from moestack.errors import EngineUnavailableError
from moestack.serve.coalesce import coalesce
from moestack.usage import Usage


def chunk(i: int, **kw) -> EngineChunk:
    return EngineChunk(f"data: {i}\n\n".encode(), Usage(5, i, 0), token_ids=(i,), **kw)


async def collect(stream) -> list[EngineChunk]:
    return [c async for c in stream]


def test_chunks_produced_together_leave_as_one_with_joined_data_and_last_usage():
    async def burst():
        yield chunk(1, status=200, content_type="text/event-stream", prompt_token_ids=(7, 8))
        for i in range(2, 5):
            yield chunk(i)

    (merged,) = asyncio.run(collect(coalesce(burst())))
    assert merged.data == b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    assert merged.token_ids == (1, 2, 3, 4)
    assert merged.usage == Usage(5, 4, 0)
    assert (merged.status, merged.content_type, merged.prompt_token_ids) == (
        200, "text/event-stream", (7, 8))


def test_chunks_produced_apart_stay_apart_and_the_first_is_not_held_back():
    async def main():
        seen = []
        release = asyncio.Event()

        async def slow():
            yield chunk(1, status=200)
            await release.wait()
            yield chunk(2)
            yield chunk(3)

        stream = coalesce(slow())
        seen.append(await asyncio.wait_for(stream.__anext__(), 5))  # before chunk 2 exists
        release.set()
        seen += [c async for c in stream]
        return seen

    seen = asyncio.run(main())
    assert [c.token_ids for c in seen] == [(1,), (2, 3)]
    assert seen[0].status == 200 and seen[1].status is None


def test_an_engine_error_comes_after_the_chunks_produced_before_it():
    async def failing():
        yield chunk(1, status=200)
        yield chunk(2)
        raise EngineUnavailableError("engine died")

    async def main():
        got = []
        with pytest.raises(EngineUnavailableError, match="engine died"):
            async for c in coalesce(failing()):
                got.append(c)
        return got

    got = asyncio.run(main())
    assert [c.token_ids for c in got] == [(1, 2)]


def test_closing_the_stream_early_stops_the_engine_stream():
    async def main():
        stopped = asyncio.Event()

        async def endless():
            try:
                i = 0
                while True:
                    i += 1
                    yield chunk(i)
                    await asyncio.sleep(0.001)
            finally:
                stopped.set()

        stream = coalesce(endless())
        first = await stream.__anext__()
        await stream.aclose()
        return first, stopped.is_set()

    first, stopped = asyncio.run(main())
    assert first.token_ids[0] == 1 and stopped
