"""Several engine replicas of one model in this process, routed by a
:class:`~moestack.routing.router.Router`.

A :class:`~moestack.api.backend.ModelBackend` for tests and the routing benchmarks: the same
policies Ray Serve runs, over in-process (usually fake) engines, without a cluster. As a
ModelServer replica does, each replica loads a request's LoRA adapter before serving it, and
reports the adapters its engine holds every ``report_interval_s`` (Ray Serve's routing stats).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from moestack.engine.protocol import Engine, EngineChunk, EngineInfo, EngineRequest
from moestack.engine.replica_adapters import ReplicaAdapters
from moestack.errors import EngineUnavailableError, ModelNotFoundError
from moestack.routing.router import Router
from moestack.routing.types import ReplicaState


class ReplicaSet:
    """Replicas (id -> started engine) of one model and the router choosing among them."""

    def __init__(self, engines: Mapping[str, Engine], router: Router,
                 max_ongoing_requests: int = 1 << 30, report_interval_s: float = 0.0):
        self.engines = dict(engines)
        self.router = router
        self.router.replica_ids = frozenset(self.engines)
        self.max_ongoing_requests = max_ongoing_requests
        self.adapters = {rid: ReplicaAdapters(e) for rid, e in self.engines.items()}
        """Per replica: its engine's adapters, loaded before the requests that name them."""
        self.report_interval_s = report_interval_s
        self._reported_at_s = float("-inf")
        self._ongoing = dict.fromkeys(self.engines, 0)
        self.routed_to: dict[str, str] = {}
        """request id -> replica id it was sent to (for tests and reports)."""

    def states(self) -> list[ReplicaState]:
        return [ReplicaState(rid, self.router.outstanding_tokens(rid), self._ongoing[rid],
                             self.max_ongoing_requests) for rid in self.engines]

    async def serve(self, request: EngineRequest,
                    tenant: str | None = None) -> AsyncIterator[EngineChunk]:
        routing_request = self.router.request_of(request, tenant)
        if routing_request.adapter is not None:
            self._report_adapters()
        order = self.router.rank(routing_request, self.states())
        if not order:
            raise EngineUnavailableError("the model has no replica")
        rid = order[0]
        self.router.routed(routing_request, rid)
        self.routed_to[request.request_id] = rid
        self._ongoing[rid] += 1
        try:
            if request.adapter is not None:
                await self.adapters[rid].ensure(request.adapter)
            async for chunk in self.engines[rid].serve(request):
                yield chunk
        finally:
            self._ongoing[rid] -= 1
            self.router.completed(request.request_id)

    def _report_adapters(self) -> None:
        now = time.monotonic()
        if now - self._reported_at_s >= self.report_interval_s:
            self._reported_at_s = now
            for rid, engine in self.engines.items():
                self.router.adapters.report(rid, engine.stats().adapters)

    async def remove_adapter(self, name: str) -> None:
        for adapters in self.adapters.values():
            await adapters.remove(name)
        self.router.adapters.remove(name)

    @property
    def adapter_loads(self) -> int:
        """Adapter loads on all replicas so far."""
        return sum(a.total_loads for a in self.adapters.values())


class ReplicaSetBackend:
    """A ModelBackend over one :class:`ReplicaSet` per model."""

    def __init__(self, replica_sets: Mapping[str, ReplicaSet]):
        self.replica_sets = dict(replica_sets)

    def _replicas(self, model: str) -> ReplicaSet:
        try:
            return self.replica_sets[model]
        except KeyError:
            raise ModelNotFoundError.of(model) from None

    def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        return self._replicas(model).serve(request)

    async def info(self, model: str) -> EngineInfo:
        return next(iter(self._replicas(model).engines.values())).info

    async def remove_adapter(self, model: str, name: str) -> None:
        await self._replicas(model).remove_adapter(name)

    async def check_health(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name, replicas in self.replica_sets.items():
            out[name] = None
            for rid, engine in replicas.engines.items():
                try:
                    await engine.check_health()
                except EngineUnavailableError as exc:
                    out[name] = f"replica {rid}: {exc.message}"
        return out
