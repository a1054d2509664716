"""What requests used and how they were routed, as plain data shared by the layers that meter it.

It lives below the API layer: the gateway's relay emits :class:`RequestRecord`; metering prices
it once (:class:`RequestCost`) and exports both; tenancy settles the ledger with both. Routers
count in :class:`RoutingCounts`, which metering exports. Money that is summed (ledger counters,
rollups, reports) is integer nano-USD (:data:`NUSD_PER_USD`, :func:`to_nusd`), so sums are exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request as the engine counted them (cumulative while it runs).

    ``prompt_tokens`` covers every prompt of the request (all list prompts), ``completion_tokens``
    every choice (all ``n``), ``cached_prompt_tokens`` the prompt tokens served from the prefix
    cache (vLLM's ``prompt_tokens_details.cached_tokens``).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


NO_USAGE = Usage()

CLIENT_CLOSED = 499
"""Status of a request whose client left before its answer ended (nginx's convention)."""


@dataclass(frozen=True)
class RequestRecord:
    """What one request did, for the usage ledger and metrics."""

    request_id: str
    model: str
    endpoint: str
    stream: bool
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_s: float | None
    e2e_s: float
    error_code: str | None = None
    tenant: str | None = None
    """Tenant the request was authenticated as; None when tenancy is off."""
    key_id: str | None = None
    adapter: str | None = None
    """The LoRA adapter the request ran with (``model`` is its base); None for a base model."""
    backend: str = "replica"
    """Who answered: ``replica`` (self-hosted) or ``provider:<name>`` (overflow)."""


@dataclass(frozen=True)
class RequestCost:
    """What one request cost, priced once when it ends
    (:meth:`moestack.metering.cost.CostModel.price`)."""

    engine_s: float
    """Replica-seconds of engine work the request's tokens took (saturated engine)."""
    self_hosted_usd: float
    """``engine_s`` at the replica's USD per second."""
    baseline_usd: Mapping[str, float]
    """Baseline API name -> USD the same tokens cost there."""
    charged_usd: float = 0.0
    """What the tenant is charged against its budget (``tenancy.prices``)."""
    provider_usd: float = 0.0
    """What an overflow provider bills for the request (0 for a replica's)."""

    @property
    def cost_usd(self) -> float:
        """What the request cost the operator: self-hosted work plus the provider's bill."""
        return self.self_hosted_usd + self.provider_usd


NUSD_PER_USD = 1_000_000_000
"""Nano-USD (1e-9 USD) per USD: the unit of every summed money figure."""


def to_nusd(usd: float | None) -> int:
    """USD as integer nano-USD (nearest); None counts as 0."""
    return int(round((usd or 0.0) * NUSD_PER_USD))


@dataclass
class RoutingCounts:
    """What a router did since it started (monotonic counts), for the gateway's metrics."""

    requests: int = 0
    """Requests routed (a failover retry is routed again)."""
    prefix_hits: int = 0
    """Requests sent to a replica that, as far as this router knows, caches part of the prompt."""
    prompt_blocks: int = 0
    """Prefix blocks of the routed prompts."""
    matched_blocks: int = 0
    """Leading prefix blocks the chosen replica already held."""
    live_replicas: int | None = None
    """Replicas the router can send to (None: not told yet)."""
