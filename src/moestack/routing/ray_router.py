"""The ModelServer deployment's Ray Serve request router, running a moestack routing policy.

Ray Serve builds one router per deployment handle (so per gateway replica, in the gateway's
process) and calls :meth:`MoestackRequestRouter.initialize_state` with ``request_router_kwargs``:
the model's name and ``routing`` config. Outstanding tokens and the prefix index are therefore per
gateway replica, an approximation that needs no coordination; Ray's own queue-length probes still
guard each replica's ``max_ongoing_requests``.

Each router registers its :class:`Router` in :data:`moestack.routing.router.ROUTERS`, so the
gateway in the same process reads the model's live replica count (to size its fair queue) and the
routing counts (metrics), and its ServeBackend reaches every live replica by id.

Replicas report the LoRA adapters they hold through Serve's routing stats (the ModelServer's
``record_routing_stats``, every :data:`~moestack.routing.adapters.REPORT_PERIOD_S`), which Serve
hands every router through :meth:`MoestackRequestRouter.update_replicas` when they change
(``RunningReplica.routing_stats``); adapter affinity reads them. A call with
a :class:`~moestack.routing.types.ReplicaTarget` argument goes to that replica only: Serve
handles do not broadcast, so the backend removes an adapter everywhere with one such call per
live replica (:meth:`moestack.serve.backend.ServeBackend.remove_adapter`).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from moestack.engine.protocol import EngineRequest
from moestack.routing.adapters import REPORT_PERIOD_S, adapter_slots
from moestack.routing.router import Router
from moestack.routing.types import ReplicaState, ReplicaTarget


def request_router_config(model: Any) -> dict[str, Any]:
    """``request_router_config`` deployment option for a :class:`ModelConfig`."""
    return {"request_router_class": f"{__name__}:{MoestackRequestRouter.__name__}",
            "request_router_kwargs": {"model": model.name,
                                      "routing": model.routing.model_dump(mode="json"),
                                      "adapter_slots": adapter_slots(model.lora_engine_args())},
            "request_routing_stats_period_s": REPORT_PERIOD_S}


def _arg(pending: PendingRequest | None, kind: type):
    if pending is None:
        return None
    for arg in pending.args:
        if isinstance(arg, kind):
            return arg
    return None


def _engine_request(pending: PendingRequest | None) -> EngineRequest | None:
    return _arg(pending, EngineRequest)


class MoestackRequestRouter(FIFOMixin, RequestRouter):
    """Ranks replicas with the configured policy; Serve sends to the first rank with room."""

    def initialize_state(self, model: str, routing: dict[str, Any],
                         adapter_slots: int = 1) -> None:
        # Imported here, not at module level: Ray may ship this class by value, with a copy of
        # the module's globals, and the registry must be the process's own.
        from moestack.config.schema import RoutingConfig
        from moestack.routing.router import ROUTERS

        self.router = Router(RoutingConfig.model_validate(routing), adapter_slots=adapter_slots)
        ROUTERS[(self.app_name, model)] = self.router

    def _state(self, replica: RunningReplica) -> ReplicaState:
        rid = replica.replica_id.unique_id
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return ReplicaState(rid, self.router.outstanding_tokens(rid), queue_len or 0,
                            replica.max_ongoing_requests)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if (target := _arg(pending_request, ReplicaTarget)) is not None:
            # Gone meanwhile: any replica answers (the calls are idempotent) with its own id.
            return [[by_id[target.replica_id]]] if target.replica_id in by_id else [
                candidate_replicas]
        request = _engine_request(pending_request)
        if request is None:  # not an API call (health, reports): any replica, at random
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        key = pending_request.metadata.internal_request_id
        # Serve asks again while every replica is full: the prompt was hashed the first time.
        routing_request = self.router.reserved(key) or self.router.request_of(request)
        order = self.router.rank(routing_request, [self._state(r) for r in candidate_replicas])
        if order:
            # Reserve the tokens on the likely choice at once: many requests of a burst are
            # ranked before the first of them is routed. on_request_routed() confirms or moves it.
            self.router.reserve(routing_request, order[0], key)
        ranks = [[by_id[order[0]]]] if order else []
        if rest := [by_id[rid] for rid in order[1:]]:
            ranks.append(rest)
        return ranks or [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        request = _engine_request(pending_request)
        if request is not None:
            key = pending_request.metadata.internal_request_id
            routing_request = self.router.reserved(key) or self.router.request_of(request)
            self.router.routed(routing_request, replica_id.unique_id, key=key)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.router.completed(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.router.forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self.curr_replicas)
        super().update_replicas(replicas)
        for gone in before - set(self.curr_replicas):
            self.router.forget(gone.unique_id)
        self.router.counts.live_replicas = len(self.curr_replicas)
        self.router.replica_ids = frozenset(r.unique_id for r in self.curr_replicas)
        for r in replicas:  # Serve tells again when a replica's routing stats change
            if (held := (r.routing_stats or {}).get("adapters")) is not None:
                self.router.adapters.report(r.replica_id.unique_id, held)
