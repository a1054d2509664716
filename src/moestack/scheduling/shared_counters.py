"""Virtual token counters shared by the gateway replicas: one small named Ray actor per model.

Design. Every gateway replica keeps its own fair queue (:mod:`moestack.scheduling.fair_queue`)
and dispatches from its own view with no remote call on the request path. Every
``fair_queue.sync_interval_s`` it sends the model's :class:`SharedCounters` what changed
(weighted real tokens settled per tenant, counter lifts), its full settled counters, its
estimate of the requests running there per tenant, which tenants are active there and the
tokens served; it takes back the merged settled counters, the other gateways' running
estimates, which tenants are active or backlogged at the other gateways and each tenant's share
of the tokens served by all gateways. Counters are thus at most one sync interval stale; a
replica's dispatch decisions use the cluster-wide service each tenant got, so a tenant that
reaches one gateway more often than another gets no more than its weight.

Why an actor and not the database: a sync is a few hundred bytes every 0.2 s per gateway and
model; the tenancy database is left to admission and the ledger, and the counters are soft state
that may be rebuilt at any time.

Failure mode. If the actor is lost (killed, node gone) or slow, a sync fails after
:data:`~moestack.scheduling.actor_client.CALL_TIMEOUT_S`: the gateway keeps its local counters
and schedules on local fairness alone (never an outage: no request waits on the actor). The
next sync creates the actor again (``get_if_exists``); a new one has a new ``epoch``, so each
gateway that had synced with the lost one seeds the new one with its full counters (merged by
maximum: each gateway's view already holds the others' work) instead of deltas, and the
gateways re-converge on shared counters. A gateway that never synced (just started; ``epoch``
None) sends deltas like any other: its counters are its own work alone, which the actor must add
to the others', not take the maximum of. A failed sync keeps the epoch it knew, so the answer of
an actor that survived a slow call is merged by deltas again (the deltas of the failed call may
be lost: at most one interval). A gateway that stops syncing drops out of the activity and share
figures after ``STALE_AFTER_S``.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Protocol

from moestack.scheduling.actor_client import ActorClient
from moestack.scheduling.fair_queue import SHARE_WINDOW_S, SyncIn, SyncOut, share_of

STALE_AFTER_S = 10.0


class SharedCounters:
    """Merged virtual token counters of one model across the gateway replicas."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.counters: dict[str, float] = {}
        self._reports: dict[str, tuple[float, dict[str, bool], dict[str, float],
                                       dict[str, float]]] = {}
        self._served: deque[tuple[float, dict[str, int]]] = deque()

    def sync(self, gateway_id: str, epoch: str | None, out: SyncOut,
             now_s: float | None = None) -> tuple[str, SyncIn]:
        """Merge one gateway's changes; answers (this actor's epoch, the merged view)."""
        now_s = time.monotonic() if now_s is None else now_s
        if epoch is not None and epoch != self.epoch:  # lost state: the gateway's view seeds it
            for tenant, counter in out.counters.items():
                self.counters[tenant] = max(self.counters.get(tenant, counter), counter)
        else:
            for tenant, lift in out.lifts.items():
                self.counters[tenant] = max(self.counters.get(tenant, lift), lift)
            for tenant, delta in out.deltas.items():
                self.counters[tenant] = self.counters.get(tenant, 0.0) + delta
        self._reports[gateway_id] = (now_s, dict(out.active), dict(out.weights),
                                     dict(out.running))
        if out.served_tokens:
            self._served.append((now_s, dict(out.served_tokens)))
        self._expire(now_s)
        elsewhere: dict[str, bool] = {}
        weights: dict[str, float] = {}
        running: dict[str, float] = {}
        for gw, (_, active, gw_weights, gw_running) in self._reports.items():
            for tenant, backlogged in active.items():
                weights[tenant] = gw_weights.get(tenant, 1.0)
                if gw != gateway_id:
                    elsewhere[tenant] = elsewhere.get(tenant, False) or backlogged
            if gw != gateway_id:
                for tenant, value in gw_running.items():
                    running[tenant] = running.get(tenant, 0.0) + value
        served: dict[str, int] = {}
        for _, tokens in self._served:
            for tenant, n in tokens.items():
                served[tenant] = served.get(tenant, 0) + n
        return self.epoch, SyncIn(dict(self.counters), elsewhere, share_of(served),
                                  share_of(weights), running)

    def snapshot(self) -> dict[str, float]:
        """The merged counters (for operators and tests)."""
        return dict(self.counters)

    def _expire(self, now_s: float) -> None:
        for gone in [g for g, (t, *_) in self._reports.items() if now_s - t > STALE_AFTER_S]:
            del self._reports[gone]
        while self._served and now_s - self._served[0][0] > SHARE_WINDOW_S:
            self._served.popleft()


class CountersLink(Protocol):
    """Where a gateway merges one model's counters with the other gateways'."""

    async def sync(self, gateway_id: str, out: SyncOut) -> SyncIn | None: ...


def shared_counters_name(app_name: str, model: str) -> str:
    return f"shared-counters:{app_name}:{model}"


class SharedCountersClient(ActorClient):
    """A gateway's :class:`CountersLink` to one model's :class:`SharedCounters` actor; creates
    it when missing, finds it again after it was lost, and remembers its epoch to know when to
    re-seed it."""

    actor_cls = SharedCounters

    def __init__(self, app_name: str, model: str):
        super().__init__(shared_counters_name(app_name, model), create=True)
        self.epoch: str | None = None

    async def sync(self, gateway_id: str, out: SyncOut) -> SyncIn | None:
        """The merged view, or None when the actor is unreachable (run on local counters)."""
        answer = await self._call("sync", gateway_id, self.epoch, out)
        if answer is None:
            return None  # keep the epoch: a new actor is seeded, a surviving one gets deltas
        self.epoch, merged = answer
        return merged
