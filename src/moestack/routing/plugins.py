"""Routing plugins: filters narrow the candidates, scorers rate them in [0, 1], pickers choose.

Each plugin is a small class; a policy (:mod:`moestack.routing.policy`) composes them. Plugins
read the shared :class:`RoutingState` (outstanding tokens, prefix index) but never change it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from moestack.routing.prefix import PrefixIndex
from moestack.routing.types import ReplicaState, RoutingRequest


class Filter(Protocol):
    def filter(self, request: RoutingRequest,
               replicas: Sequence[ReplicaState]) -> list[ReplicaState]: ...


class Scorer(Protocol):
    def score(self, request: RoutingRequest,
              replicas: Sequence[ReplicaState]) -> dict[str, float]:
        """A score in [0, 1] per replica id; higher is better."""


class Picker(Protocol):
    def pick(self, scores: dict[str, float]) -> list[str]:
        """Replica ids in order of preference (the first is the choice)."""


# ---- filters -------------------------------------------------------------------------------

class CapacityFilter:
    """Drops replicas at ``max_ongoing_requests``; keeps all if all are full (Serve then waits)."""

    def filter(self, request, replicas):
        return [r for r in replicas if r.has_capacity] or list(replicas)


@dataclass
class LoadGuardFilter:
    """Drops replicas with more than ``guard_tokens`` outstanding tokens above the least loaded.

    Put before a prefix scorer, it keeps cache affinity from piling work on one hot replica.
    """

    guard_tokens: int

    def filter(self, request, replicas):
        if not replicas:
            return []
        floor = min(r.outstanding_tokens for r in replicas)
        return [r for r in replicas if r.outstanding_tokens <= floor + self.guard_tokens]


@dataclass
class TenantShardFilter:
    """Keeps the ``replicas_per_tenant`` replicas a tenant hashes to (rendezvous hashing).

    Each tenant gets a stable subset of replicas, so one tenant's burst or its prompts' cache
    footprint lands on a few replicas and others keep theirs; requests without a tenant pass.
    """

    replicas_per_tenant: int

    def filter(self, request, replicas):
        if request.tenant is None or len(replicas) <= self.replicas_per_tenant:
            return list(replicas)
        ranked = sorted(replicas, key=lambda r: _rendezvous(request.tenant, r.replica_id))
        return ranked[:self.replicas_per_tenant]


def _rendezvous(tenant: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{tenant}\x00{replica_id}".encode(), digest_size=8).digest()


# ---- scorers -------------------------------------------------------------------------------

class LoadScorer:
    """1 for a replica with no outstanding tokens, falling linearly to 0 at the most loaded."""

    def score(self, request, replicas):
        most = max((r.outstanding_tokens for r in replicas), default=0)
        if most <= 0:
            return {r.replica_id: 1.0 for r in replicas}
        return {r.replica_id: 1.0 - r.outstanding_tokens / most for r in replicas}


@dataclass
class PrefixScorer:
    """Share of the request's prefix blocks the replica was last sent (0 with no blocks)."""

    index: PrefixIndex

    def score(self, request, replicas):
        if not request.prefix_blocks:
            return {r.replica_id: 0.0 for r in replicas}
        matched = self.index.match(request.prefix_blocks, (r.replica_id for r in replicas))
        total = len(request.prefix_blocks)
        return {rid: n / total for rid, n in matched.items()}


# ---- pickers -------------------------------------------------------------------------------

@dataclass
class MaxScorePicker:
    """Highest score first; ties broken at random so equal replicas share the load."""

    rng: random.Random

    def pick(self, scores):
        ids = list(scores)
        self.rng.shuffle(ids)
        return sorted(ids, key=lambda rid: -scores[rid])


@dataclass
class PowerOfTwoPicker:
    """Two replicas at random, the better scored first (power of two choices)."""

    rng: random.Random

    def pick(self, scores):
        ids = list(scores)
        if len(ids) <= 2:
            self.rng.shuffle(ids)
            return sorted(ids, key=lambda rid: -scores[rid])
        pair = self.rng.sample(ids, 2)
        return sorted(pair, key=lambda rid: -scores[rid])
