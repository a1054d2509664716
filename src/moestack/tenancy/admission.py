"""Authentication and admission against the store: keys, model ACL, RPM/TPM/concurrency, budget.

Admission is one transaction per request: lock the tenant's row, read its limits (so changes take
effect at once), check the limits over the tenant's ledger rows, and insert the request's
write-ahead ledger row with its reservation. Limits are sliding windows over the ledger itself:

* requests/min: rows started in the last 60 s;
* tokens/min: ``charged_tokens`` of those rows (prompt + max completion reserved while running,
  the real count once settled);
* concurrency: ``pending`` rows whose lease has not run out;
* budget: ``charged_usd`` of rows started in the current period (UTC day, UTC month, or ever).

Because the reservation is an upper bound of the real cost and is in the table before the engine
sees the request, concurrent and streamed requests cannot overspend, on any number of gateways.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from moestack.errors import (
    AuthenticationError,
    InsufficientQuotaError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
)
from moestack.tenancy.keys import parse_key, secret_matches
from moestack.tenancy.models import Tenant, UsageRow, allows_model, utcnow
from moestack.tenancy.store import TenancyStore

WINDOW_S = 60.0


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the tenant behind an API key."""

    tenant_id: int
    tenant: str
    key_id: str
    priority: int
    weight: float
    allowed_models: tuple[str, ...]

    def allows(self, model: str) -> bool:
        return allows_model(self.allowed_models, model)


@dataclass(frozen=True)
class Reservation:
    """What admission holds for a request until it is settled."""

    request_id: str
    tokens: int
    usd: float


def authenticate(store: TenancyStore, api_key: str | None) -> Principal:
    """The principal of a bearer key; 401 for a missing, malformed, unknown or revoked key."""
    if not api_key:
        raise AuthenticationError("Missing API key: send `Authorization: Bearer <key>`.")
    parsed = parse_key(api_key)
    key_id, secret = parsed if parsed else ("", api_key)
    found = store.key_record(key_id) if parsed else None
    ok = secret_matches(secret, found[0].secret_sha256 if found else None)
    if not ok or found is None or found[0].revoked_at is not None:
        raise AuthenticationError("Incorrect API key provided.")
    key, tenant = found
    return Principal(tenant.id, tenant.name, key.key_id, tenant.priority, tenant.weight,
                     tuple(tenant.allowed_models))


def check_model_access(principal: Principal, model: str) -> None:
    if not principal.allows(model):
        raise PermissionDeniedError(
            f"Tenant `{principal.tenant}` may not use the model `{model}`.", param="model")


def period_bounds(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """Start and end (None: never ends) of the budget period containing ``now`` (naive UTC)."""
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + dt.timedelta(days=1)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        return start, end
    return dt.datetime(1970, 1, 1), None


def admit(store: TenancyStore, principal: Principal, *, reservation: Reservation, model: str,
          endpoint: str, stream: bool, gateway_id: str, lease_s: float,
          now: dt.datetime | None = None) -> float | None:
    """Check every limit and write the request's ledger row ahead, or raise 429.

    Returns the USD left in the tenant's budget period net of this and every running
    reservation (None when the tenant has no budget)."""
    now = now or utcnow()
    window_start = now - dt.timedelta(seconds=WINDOW_S)
    remaining = None
    with store.session() as s:
        tenant = s.scalar(select(Tenant).where(Tenant.id == principal.tenant_id)
                          .with_for_update())
        if tenant is None:  # deleted since authentication
            raise AuthenticationError("Incorrect API key provided.")
        mine = UsageRow.tenant_id == tenant.id
        if tenant.max_concurrent_requests is not None:
            running = s.scalar(select(func.count()).where(
                mine, UsageRow.state == "pending", UsageRow.lease_expires_at >= now))
            if running >= tenant.max_concurrent_requests:
                raise RateLimitError(
                    f"Rate limit reached for concurrent requests: limit "
                    f"{tenant.max_concurrent_requests}, in flight {running}.", retry_after_s=1.0)
        if tenant.requests_per_min is not None or tenant.tokens_per_min is not None:
            recent = s.execute(select(UsageRow.started_at, UsageRow.charged_tokens)
                               .where(mine, UsageRow.started_at > window_start)
                               .order_by(UsageRow.started_at)).all()
            _check_rpm(tenant.requests_per_min, recent, now)
            _check_tpm(tenant.tokens_per_min, recent, reservation.tokens, now)
        if tenant.budget_usd is not None:
            start, end = period_bounds(tenant.budget_period, now)
            spent = s.scalar(select(func.coalesce(func.sum(UsageRow.charged_usd), 0.0))
                             .where(mine, UsageRow.started_at >= start))
            if spent + reservation.usd > tenant.budget_usd:
                retry = (end - now).total_seconds() if end else 86400.0
                raise InsufficientQuotaError(
                    f"You exceeded your current quota: budget {tenant.budget_usd:g} USD per "
                    f"{tenant.budget_period}, {spent:.6f} USD spent or reserved, this request "
                    f"reserves up to {reservation.usd:.6f} USD.", retry_after_s=retry)
            remaining = tenant.budget_usd - spent - reservation.usd
        s.add(UsageRow(
            request_id=reservation.request_id, tenant_id=tenant.id, key_id=principal.key_id,
            model=model, endpoint=endpoint, stream=stream, state="pending",
            reserved_tokens=reservation.tokens, reserved_usd=reservation.usd,
            charged_tokens=reservation.tokens, charged_usd=reservation.usd, started_at=now,
            gateway_id=gateway_id, lease_expires_at=now + dt.timedelta(seconds=lease_s)))
        try:
            s.flush()
        except IntegrityError:
            raise InvalidRequestError(f"request id `{reservation.request_id}` was already used",
                                      code="duplicate_request_id") from None
    return remaining


def _check_rpm(limit: int | None, recent: list, now: dt.datetime) -> None:
    if limit is None or len(recent) < limit:
        return
    # The request can go once enough of the oldest rows have left the window.
    leaving = recent[len(recent) - limit][0] if limit > 0 else None
    retry = _until_leaves(leaving, now)
    raise RateLimitError(f"Rate limit reached for requests per minute: limit {limit}, "
                         f"used {len(recent)}.", retry_after_s=retry)


def _check_tpm(limit: int | None, recent: list, need: int, now: dt.datetime) -> None:
    if limit is None:
        return
    used = sum(tokens for _, tokens in recent)
    if used + need <= limit:
        return
    if need > limit:
        raise RateLimitError(f"Rate limit reached for tokens per minute: this request reserves "
                             f"{need} tokens (prompt + max completion), more than the limit "
                             f"{limit}; lower max_tokens.", retry_after_s=WINDOW_S)
    freed, retry = 0, WINDOW_S
    for started, tokens in recent:
        freed += tokens
        if used - freed + need <= limit:
            retry = _until_leaves(started, now)
            break
    raise RateLimitError(f"Rate limit reached for tokens per minute: limit {limit}, used "
                         f"{used}, requested {need}.", retry_after_s=retry)


def _until_leaves(started: dt.datetime | None, now: dt.datetime) -> float:
    if started is None:
        return WINDOW_S
    return max(0.05, (started - now).total_seconds() + WINDOW_S)
