"""The router of one model's replicas: the configured policy plus the state it reads.

A :class:`Router` owns the state every policy reads (outstanding tokens per replica, the prefix
index, which replica holds which LoRA adapter) and keeps it current through
:meth:`Router.routed`, :meth:`Router.completed` and :meth:`Router.forget`; it counts what it
did in a :class:`~moestack.usage.RoutingCounts`. It is transport-free: the Ray Serve request
router (:mod:`moestack.routing.ray_router`) and the in-process replica set
(:mod:`moestack.routing.replica_set`) both drive it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moestack.engine.protocol import EngineRequest
from moestack.routing.adapters import AdapterAffinity, AdapterIndex
from moestack.routing.policy import POLICIES, Pipeline, check_policy
from moestack.routing.prefix import PrefixIndex, block_hashes
from moestack.routing.types import (
    CHARS_PER_TOKEN_ESTIMATE,
    DEFAULT_MAX_TOKENS_ESTIMATE,
    ReplicaState,
    RoutingRequest,
)
from moestack.usage import RoutingCounts

if TYPE_CHECKING:
    from moestack.config.schema import RoutingConfig


ROUTERS: dict[tuple[str, str], Router] = {}
"""(application, model) -> the router of this process's handle to that model's replicas (set by
:mod:`moestack.routing.ray_router`; the gateway reads live replicas and counts from it)."""

RESERVATION_TTL_S = 60.0
"""A reservation never confirmed by routing (request cancelled while queued) expires after this."""

LEFT_TTL_S = 3600.0
"""How long :attr:`Router.left` remembers the requests of a replica that left."""


@dataclass
class _InFlight:
    replica_id: str
    request: RoutingRequest


@dataclass
class Router:
    """Routing state plus the configured policy; not thread-safe (one event loop drives it)."""

    config: RoutingConfig
    seed: int | None = None
    adapter_slots: int = 1
    """Adapters one replica holds at once (see :func:`moestack.routing.adapters.adapter_slots`)."""
    index: PrefixIndex = field(init=False)
    pipeline: Pipeline = field(init=False)
    adapters: AdapterIndex = field(init=False)
    """Which replica holds which LoRA adapter, as far as this router knows."""
    replica_ids: frozenset[str] = field(default=frozenset(), init=False)
    """The live replicas, as last told (Ray Serve's router tells it; see ray_router)."""
    counts: RoutingCounts = field(default_factory=RoutingCounts, init=False)
    _outstanding: dict[str, int] = field(default_factory=dict, init=False)
    _in_flight: dict[str, _InFlight] = field(default_factory=dict, init=False)
    _reserved_at_s: dict[str, float] = field(default_factory=dict, init=False)
    """Keys only reserved so far (see :meth:`reserve`), oldest first, with their time."""
    left: dict[str, float] = field(default_factory=dict, init=False)
    """Request id -> ``time.monotonic()`` when its replica left the live set (it is draining or
    died) while the request ran there; oldest first. Only :meth:`forget` writes it, so another
    thread may read it (:meth:`moestack.serve.backend.ServeBackend.serve` does)."""

    def __post_init__(self) -> None:
        check_policy(self.config.policy)
        self.index = PrefixIndex(self.config.prefix_index_blocks)
        self.pipeline = POLICIES[self.config.policy](self.config, self.index,
                                                     random.Random(self.seed))
        self.adapters = AdapterIndex(max(1, self.adapter_slots))
        self._affinity = AdapterAffinity(self.adapters, self.config.load_guard_tokens)

    def request_of(self, request: EngineRequest, tenant: str | None = None) -> RoutingRequest:
        estimate = request.estimated_tokens or (
            -(-len(request.prompt_text) // CHARS_PER_TOKEN_ESTIMATE)
            + DEFAULT_MAX_TOKENS_ESTIMATE)
        return RoutingRequest(
            request_id=request.request_id,
            prefix_blocks=block_hashes(request.prompt_text, self.config.prefix_block_chars),
            estimated_tokens=estimate,
            tenant=tenant if tenant is not None else request.tenant,
            adapter=request.adapter.name if request.adapter is not None else None)

    def outstanding_tokens(self, replica_id: str) -> int:
        return self._outstanding.get(replica_id, 0)

    def rank(self, request: RoutingRequest, replicas: Sequence[ReplicaState]) -> list[str]:
        """Replica ids, most preferred first (may be fewer than given: pickers may sample)."""
        self._expire_reservations()
        if not replicas:
            return []
        if request.adapter is not None and self.config.adapter_affinity:
            return self._affinity.order(request, replicas, self.pipeline.rank)
        return self.pipeline.rank(request, replicas)

    def reserve(self, request: RoutingRequest, replica_id: str, key: str) -> None:
        """Count the request on its likely replica before it is routed (see :meth:`routed`)."""
        self.completed(key)
        self._in_flight[key] = _InFlight(replica_id, request)
        self._reserved_at_s[key] = time.monotonic()
        self._add(replica_id, request.estimated_tokens)
        if request.adapter is not None:  # a burst's next requests see the adapter placed
            self.adapters.routed(replica_id, request.adapter)

    def reserved(self, key: str) -> RoutingRequest | None:
        """The request reserved under ``key`` and not routed yet, if any."""
        return self._in_flight[key].request if key in self._reserved_at_s else None

    def _expire_reservations(self) -> None:
        cutoff = time.monotonic() - RESERVATION_TTL_S
        while self._reserved_at_s:
            key, at_s = next(iter(self._reserved_at_s.items()))
            if at_s >= cutoff:
                return
            self.completed(key)

    def routed(self, request: RoutingRequest, replica_id: str, key: str | None = None) -> None:
        """Record that ``request`` went to ``replica_id``; ``key`` identifies it in completed().

        A reservation under the same key is replaced (moved if it went elsewhere).
        """
        key = key or request.request_id
        self.completed(key)
        self._in_flight[key] = _InFlight(replica_id, request)
        self._add(replica_id, request.estimated_tokens)
        matched = self.index.insert(request.prefix_blocks, replica_id)
        if request.adapter is not None:
            self.adapters.asked(request.adapter)
            self.adapters.routed(replica_id, request.adapter)
        self.counts.requests += 1
        self.counts.prefix_hits += matched > 0
        self.counts.prompt_blocks += len(request.prefix_blocks)
        self.counts.matched_blocks += matched

    def completed(self, key: str) -> None:
        self._reserved_at_s.pop(key, None)
        done = self._in_flight.pop(key, None)
        if done is not None:
            self._add(done.replica_id, -done.request.estimated_tokens)

    def _add(self, replica_id: str, tokens: int) -> None:
        self._outstanding[replica_id] = max(0, self.outstanding_tokens(replica_id) + tokens)

    def forget(self, replica_id: str) -> None:
        """The replica is gone (draining or dead): drop its load and its prefixes, and note
        the requests it had under way in :attr:`left`."""
        now = time.monotonic()
        while self.left and next(iter(self.left.values())) < now - LEFT_TTL_S:
            del self.left[next(iter(self.left))]
        self._outstanding.pop(replica_id, None)
        for key in [k for k, f in self._in_flight.items() if f.replica_id == replica_id]:
            request = self._in_flight.pop(key).request
            if self._reserved_at_s.pop(key, None) is None:  # routed there, not just reserved
                self.left[request.request_id] = now
        self.index.forget(replica_id)
        self.adapters.forget(replica_id)
