"""The gateway's half of draining (:meth:`moestack.serve.backend.ServeBackend.serve`): a
resumable stream whose replica left the live set (:attr:`moestack.routing.Router.left`) at least
``drain_after_s`` ago ends with :class:`ReplicaDrainingError` and its replica call is cancelled,
so the gateway resumes it elsewhere and the replica can stop. Over a stand-in for the Serve
handle (the layer below); the real scale-down is in tests/integration/test_migration_replicas.py.
"""

import time

import pytest

from moestack.config.schema import RoutingConfig
from moestack.engine.protocol import EngineChunk, EngineRequest
from moestack.errors import ReplicaDrainingError
from moestack.routing.router import ROUTERS, Router
from moestack.routing.types import RoutingRequest
from moestack.serve.backend import ServeBackend

APP, MODEL = "drain-test", "m"


class Call:
    """One streamed replica call: three chunks, the first resumable unless told otherwise."""

    def __init__(self, resumable: bool):
        self.resumable = resumable
        self.cancelled = False

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        ids = (1, 2) if self.resumable else None
        yield EngineChunk(b"data: a\n\n", status=200, prompt_token_ids=ids)
        yield EngineChunk(b"data: b\n\n")
        yield EngineChunk(b"data: c\n\n")

    def cancel(self):
        self.cancelled = True


class Handle:
    app_name = APP

    def __init__(self, resumable: bool = True):
        self.calls: list[Call] = []
        self.resumable = resumable
        self.serve = self

    def options(self, stream: bool):
        return self

    def remote(self, request):
        self.calls.append(Call(self.resumable))
        return self.calls[-1]


@pytest.fixture
def router():
    r = Router(RoutingConfig())
    r.replica_ids = frozenset({"live"})
    ROUTERS[(APP, MODEL)] = r
    yield r
    del ROUTERS[(APP, MODEL)]


def left_long_ago(router: Router, request_id: str) -> None:
    router.routed(RoutingRequest(request_id, estimated_tokens=1), "draining", key="k")
    router.forget("draining")
    router.left[request_id] = time.monotonic() - 60


async def read(backend, request):
    return [c.data async for c in backend.serve(MODEL, request)]


async def test_a_resumable_stream_on_a_draining_replica_ends_to_move_and_cancels_its_call(router):
    handle = Handle()
    backend = ServeBackend({MODEL: handle})
    left_long_ago(router, "r1")
    got = []
    with pytest.raises(ReplicaDrainingError):
        async for chunk in backend.serve(MODEL, EngineRequest("r1", "/v1/completions", b"{}",
                                                              drain_after_s=2.0)):
            got.append(chunk.data)
    assert got == [b"data: a\n\n"] and handle.calls[0].cancelled
    assert backend.drained[MODEL] == 1


@pytest.mark.parametrize("case", ["not-drainable", "not-resumable", "no-live-replica",
                                  "too-recent", "replica-stays"])
async def test_other_streams_finish_where_they_are(router, case):
    handle = Handle(resumable=case != "not-resumable")
    backend = ServeBackend({MODEL: handle})
    if case != "replica-stays":
        left_long_ago(router, "r1")
    if case == "no-live-replica":
        router.replica_ids = frozenset()
    if case == "too-recent":
        router.left["r1"] = time.monotonic()
    request = EngineRequest("r1", "/v1/completions", b"{}",
                            drain_after_s=None if case == "not-drainable" else 30.0)
    assert len(await read(backend, request)) == 3
    assert not handle.calls[0].cancelled and backend.drained[MODEL] == 0
