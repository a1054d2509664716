"""What a request used, as plain data shared by the layers that meter it.

It lives below the API layer: the gateway's relay emits :class:`RequestRecord`; tenancy settles
the ledger with it and metering prices and exports it.
"""

from __future__ import annotations

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
