"""Plain data the routing plugins work on: one request, and a snapshot of one replica."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS_ESTIMATE = 256
"""Completion tokens assumed for a request without ``max_tokens`` when estimating its load."""

CHARS_PER_TOKEN_ESTIMATE = 4
"""Characters per token assumed when a prompt is routed before it is tokenized."""


@dataclass(frozen=True)
class RoutingRequest:
    """What a router knows about a request before it is sent anywhere."""

    request_id: str
    prefix_blocks: tuple[int, ...] = ()
    """Chained hashes of the prompt's leading blocks (see :mod:`moestack.routing.prefix`)."""
    estimated_tokens: int = 0
    """Prompt tokens plus the completion budget: the work the request adds to a replica."""
    tenant: str | None = None
    adapter: str | None = None
    """The LoRA adapter the request runs with (see :mod:`moestack.routing.adapters`)."""


@dataclass(frozen=True)
class ReplicaTarget:
    """An argument that pins a call to one replica: the Ray Serve request router sends a call
    carrying it to that replica only (used to reach every replica, e.g. to remove an adapter)."""

    replica_id: str


@dataclass(frozen=True)
class ReplicaState:
    """A replica as a router sees it at the time of a decision."""

    replica_id: str
    outstanding_tokens: int = 0
    """Estimated tokens of the requests this router sent there that have not completed."""
    ongoing_requests: int = 0
    max_ongoing_requests: int = 1 << 30

    @property
    def has_capacity(self) -> bool:
        return self.ongoing_requests < self.max_ongoing_requests
