"""Routing policies: filters -> weighted scorers -> picker, built from config by name.

:data:`POLICIES` is the registry (the ``routing.policy`` config value -> builder); a
:class:`~moestack.routing.router.Router` builds its :class:`Pipeline` from it and keeps the
state the plugins read.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moestack.errors import ConfigError
from moestack.routing.plugins import (
    CapacityFilter,
    Filter,
    LoadGuardFilter,
    LoadScorer,
    MaxScorePicker,
    Picker,
    PowerOfTwoPicker,
    PrefixScorer,
    Scorer,
    TenantShardFilter,
)
from moestack.routing.prefix import PrefixIndex
from moestack.routing.types import ReplicaState, RoutingRequest

if TYPE_CHECKING:
    from moestack.config.schema import RoutingConfig


@dataclass
class Pipeline:
    """One policy: the filters in order, scorers with weights, and a picker."""

    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker

    def rank(self, request: RoutingRequest, replicas: Sequence[ReplicaState]) -> list[str]:
        candidates = list(replicas)
        for f in self.filters:
            candidates = f.filter(request, candidates)
        total_weight = sum(w for _, w in self.scorers) or 1.0
        scores = {r.replica_id: 0.0 for r in candidates}
        for scorer, weight in self.scorers:
            for rid, s in scorer.score(request, candidates).items():
                scores[rid] += weight * s / total_weight
        return self.picker.pick(scores)


PolicyBuilder = Callable[["RoutingConfig", PrefixIndex, random.Random], Pipeline]
POLICIES: dict[str, PolicyBuilder] = {}
"""The registry: policy name (the `routing.policy` config value) -> builder."""


def check_policy(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a registered policy (checked when an app is
    built: the config tree does not import the registry)."""
    if name not in POLICIES:
        raise ConfigError(f"routing.policy: unknown routing policy {name!r}; known: "
                          f"{', '.join(sorted(POLICIES))}")


def register_policy(name: str) -> Callable[[PolicyBuilder], PolicyBuilder]:
    def add(builder: PolicyBuilder) -> PolicyBuilder:
        POLICIES[name] = builder
        return builder
    return add


@register_policy("least_outstanding_tokens")
def _least_outstanding_tokens(config, index, rng):
    """Power of two choices on outstanding tokens (prompt + completion budget)."""
    return Pipeline([CapacityFilter()], [(LoadScorer(), 1.0)], PowerOfTwoPicker(rng))


@register_policy("prefix_affinity")
def _prefix_affinity(config, index, rng):
    """Longest cached prefix among replicas within the load guard, then least loaded."""
    return Pipeline([CapacityFilter(), LoadGuardFilter(config.load_guard_tokens)],
                    [(PrefixScorer(index), config.prefix_weight),
                     (LoadScorer(), config.load_weight)],
                    MaxScorePicker(rng))


@register_policy("tenant_least_outstanding_tokens")
def _tenant_least_outstanding_tokens(config, index, rng):
    """Each tenant on its own few replicas, power of two choices among them."""
    return Pipeline([CapacityFilter(), TenantShardFilter(config.tenant_replicas)],
                    [(LoadScorer(), 1.0)], PowerOfTwoPicker(rng))


@register_policy("tenant_prefix_affinity")
def _tenant_prefix_affinity(config, index, rng):
    """Prefix affinity inside each tenant's replica shard (tenants' prompts rarely overlap)."""
    return Pipeline([CapacityFilter(), TenantShardFilter(config.tenant_replicas),
                     LoadGuardFilter(config.load_guard_tokens)],
                    [(PrefixScorer(index), config.prefix_weight),
                     (LoadScorer(), config.load_weight)],
                    MaxScorePicker(rng))


@register_policy("random")
def _random(config, index, rng):
    """Uniformly random among replicas with capacity: the baseline for benchmarks."""
    return Pipeline([CapacityFilter()], [], MaxScorePicker(rng))
