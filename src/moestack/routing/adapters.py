"""LoRA-adapter affinity: send a request to a replica that already holds its adapter.

Loading an adapter costs a replica a stall (vLLM reads the weights and copies them in while its
engine step waits), and each replica holds only a few (``max_cpu_loras`` in memory, ``max_loras``
per batch; least recently used out). :class:`AdapterAffinity` is a stage in front of any routing
policy (:mod:`moestack.routing.policy`): for a request naming an adapter it puts first the
replicas that hold it, leaving out those above the load guard (more outstanding tokens than the
least loaded replica plus ``routing.load_guard_tokens``, the guard of prefix affinity), and lets
the policy order each group as it would have. For an adapter no replica within the guard holds,
it puts first the replica where loading it costs least: one with a free adapter slot, else the
one whose least recently used adapter (the one the load evicts) has had the fewest requests.
Requests without an adapter, and all requests with ``routing.adapter_affinity`` off, are routed
by the policy alone, as before.

What a replica holds is known two ways, kept in :class:`AdapterIndex`: the router's own record
of the adapters it sent to each replica (an LRU of the replica's adapter slots, as the engine's
own), corrected by each replica's report of what its engine holds (``EngineStats.adapters``,
which also covers other gateways' traffic, evictions and removals).

Why moestack's own router and not Ray Serve's model multiplexing (``serve.multiplexed``,
``multiplexed_model_id``):

* Multiplexing keeps its own per-replica LRU of model objects that a user function loads; vLLM
  already keeps the adapter LRU inside the engine. Two LRUs would disagree (Serve counting an
  adapter as held after vLLM evicted it), and evicting on Serve's side frees nothing in vLLM.
* Serve's multiplexed routing prefers replicas holding the id, else the fewest ids, and measures
  load by queue length only; the ModelServer deployment already runs moestack's request router
  (outstanding tokens, prefix affinity, tenant shards, one load guard). Affinity as one more
  stage keeps every policy, its load measure and its tests (in-process, without Ray).
* A multiplexed id is a bare name the replica must resolve; the request already carries its
  adapter (name, path, hash) from the gateway's registry, the one source of who may use what.

From Serve we take the report channel multiplexing itself uses: a replica's
``record_routing_stats`` answer reaches every handle's router as ``RunningReplica.routing_stats``
(see :mod:`moestack.routing.ray_router`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moestack.routing.types import ReplicaState, RoutingRequest

REPORT_PERIOD_S = 2.0
"""How often replicas report the adapters they hold (Ray Serve's routing-stats period)."""

REPORT_GRACE_S = 2 * REPORT_PERIOD_S
"""An adapter routed to a replica this recently stays counted as held even if the replica's
report does not list it yet (the report may predate the load)."""

POPULARITY_HALVING_REQUESTS = 10_000
"""Request counts per adapter are halved every this many adapter requests (recent popularity)."""


def adapter_slots(engine_args: Mapping[str, Any]) -> int:
    """Adapters one replica holds at once for these vLLM engine args (0: LoRA off)."""
    if not engine_args.get("enable_lora"):
        return 0
    return int(engine_args.get("max_cpu_loras") or engine_args.get("max_loras") or 1)


@dataclass
class AdapterIndex:
    """Per replica, the adapters it holds as far as this router knows (least recent first),
    and how often each adapter was asked for lately."""

    slots: int = 1
    _held: dict[str, OrderedDict[str, float]] = field(default_factory=dict, init=False)
    """replica id -> adapter -> when this router last sent it there (monotonic s; 0: reported)."""
    _reports: dict[str, frozenset[str]] = field(default_factory=dict, init=False)
    requests: Counter[str] = field(default_factory=Counter, init=False)

    def holders(self, adapter: str, replica_ids: Iterable[str]) -> list[str]:
        return [rid for rid in replica_ids if adapter in self._held.get(rid, ())]

    def held(self, replica_id: str) -> list[str]:
        return list(self._held.get(replica_id, ()))

    def reported(self, replica_id: str) -> frozenset[str] | None:
        """What the replica last reported holding (None: no report yet)."""
        return self._reports.get(replica_id)

    def eviction_cost(self, replica_id: str) -> float:
        """Recent requests for the adapter a load on ``replica_id`` would evict (-1: a slot is
        free, nothing is evicted)."""
        held = self._held.get(replica_id)
        if not held or len(held) < self.slots:
            return -1.0
        return float(self.requests[next(iter(held))])

    def asked(self, adapter: str) -> None:
        self.requests[adapter] += 1
        if sum(self.requests.values()) >= POPULARITY_HALVING_REQUESTS:
            self.requests = Counter({a: n // 2 for a, n in self.requests.items() if n > 1})

    def routed(self, replica_id: str, adapter: str) -> None:
        held = self._held.setdefault(replica_id, OrderedDict())
        held[adapter] = time.monotonic()
        held.move_to_end(adapter)
        while len(held) > max(1, self.slots):
            held.popitem(last=False)

    def report(self, replica_id: str, adapters: Iterable[str]) -> None:
        """The replica says its engine holds ``adapters`` now. Only a changed report is applied:
        adapters it no longer lists are dropped unless this router sent them there within
        :data:`REPORT_GRACE_S`; listed ones this router did not know are added as least recent."""
        reported = frozenset(adapters)
        if self._reports.get(replica_id) == reported:
            return
        self._reports[replica_id] = reported
        held = self._held.setdefault(replica_id, OrderedDict())
        cutoff = time.monotonic() - REPORT_GRACE_S
        for name in [n for n, at in held.items() if n not in reported and at < cutoff]:
            del held[name]
        for name in sorted(reported - held.keys()):
            held[name] = 0.0
            held.move_to_end(name, last=False)
        while len(held) > max(1, self.slots):
            held.popitem(last=False)

    def remove(self, adapter: str) -> None:
        """The adapter was removed everywhere."""
        for held in self._held.values():
            held.pop(adapter, None)
        self.requests.pop(adapter, None)

    def forget(self, replica_id: str) -> None:
        self._held.pop(replica_id, None)
        self._reports.pop(replica_id, None)


@dataclass
class AdapterAffinity:
    """The affinity stage (see the module docstring): splits the candidates into preferred and
    the rest; ``rank`` (the policy) orders each group."""

    index: AdapterIndex
    load_guard_tokens: int

    def order(self, request: RoutingRequest, replicas: Sequence[ReplicaState],
              rank) -> list[str]:
        floor = min(r.outstanding_tokens for r in replicas)
        eligible = [r for r in replicas if r.has_capacity
                    and r.outstanding_tokens <= floor + self.load_guard_tokens]
        holders = set(self.index.holders(request.adapter, (r.replica_id for r in eligible)))
        if holders:
            preferred = [r for r in eligible if r.replica_id in holders]
        elif eligible:
            cost = {r.replica_id: self.index.eviction_cost(r.replica_id) for r in eligible}
            cheapest = min(cost.values())
            preferred = [r for r in eligible if cost[r.replica_id] == cheapest]
        else:
            preferred = []
        if not preferred:
            return rank(request, replicas)
        chosen = {r.replica_id for r in preferred}
        rest = [r for r in replicas if r.replica_id not in chosen]
        return rank(request, preferred) + (rank(request, rest) if rest else [])
