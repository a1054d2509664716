"""The usage ledger: one row per admitted request, written ahead, settled exactly once.

Life of a row: :func:`moestack.tenancy.admission.admit` inserts it as ``pending`` with the
reservation (``charged_* = reserved_*``) and a lease; :func:`settle` replaces the reservation with
the real counts in a conditional update, so settling twice changes nothing (idempotent by request
id). While the request runs its gateway renews the lease (:func:`renew_leases`); if the gateway is
killed, :func:`close_lost` marks the row ``lost`` once the lease ran out, keeping the reservation as
the charge (an upper bound, so a crash can never let a tenant overspend). A late settle of a
``lost`` row still replaces the reservation by the real figures. Requests refused before admission
(401/403/429) have no row; they are counted in metrics.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select, update

from moestack.usage import RequestRecord
from moestack.tenancy.models import Tenant, UsageRow, utcnow
from moestack.tenancy.store import TenancyStore


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger row as plain data (what ``moestack usage`` and ``cost report`` read).

    Fields: ``request_id`` (unique; the OpenAI response id), ``tenant`` (name), ``key_id``,
    ``model``, ``endpoint`` (``chat.completions`` | ``completions``), ``stream``, ``state``
    (``pending`` while running, ``settled``, or ``lost`` when its gateway died), ``status_code``
    (HTTP status; 499 when the client went away; None while pending or lost), ``error_code``,
    ``prompt_tokens``, ``cached_prompt_tokens``, ``completion_tokens`` (real counts, 0 until
    settled), ``charged_tokens`` / ``charged_usd`` (what counts against the tenant's limits: the
    reservation until settled, then the real figure), ``cost_usd`` (self-hosted cost, None if not
    priced), ``baseline_costs_usd`` (baseline API name -> USD, None if not priced), ``ttft_s``,
    ``e2e_s``, ``started_at``, ``finished_at`` (naive UTC datetimes).
    """

    request_id: str
    tenant: str
    key_id: str | None
    model: str
    endpoint: str
    stream: bool
    state: str
    status_code: int | None
    error_code: str | None
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    charged_tokens: int
    charged_usd: float
    cost_usd: float | None
    baseline_costs_usd: dict[str, float] | None
    ttft_s: float | None
    e2e_s: float | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


def query_usage(store: TenancyStore, tenant: str | None = None, since: dt.datetime | None = None,
                until: dt.datetime | None = None, limit: int | None = None) -> list[LedgerEntry]:
    """Ledger rows, oldest first; filters are ANDed; datetimes are naive UTC."""
    q = select(UsageRow, Tenant.name).join(Tenant, Tenant.id == UsageRow.tenant_id)
    if tenant is not None:
        q = q.where(Tenant.name == tenant)
    if since is not None:
        q = q.where(UsageRow.started_at >= since)
    if until is not None:
        q = q.where(UsageRow.started_at < until)
    q = q.order_by(UsageRow.started_at, UsageRow.request_id)
    if limit is not None:
        q = q.limit(limit)
    with store.session() as s:
        return [_entry(row, name) for row, name in s.execute(q)]


def _entry(r: UsageRow, tenant: str) -> LedgerEntry:
    return LedgerEntry(
        r.request_id, tenant, r.key_id, r.model, r.endpoint, r.stream, r.state, r.status_code,
        r.error_code, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens,
        r.charged_tokens, r.charged_usd, r.cost_usd, r.baseline_costs_usd, r.ttft_s, r.e2e_s,
        r.started_at, r.finished_at)


def settle(store: TenancyStore, record: RequestRecord, charged_usd: float,
           cost_usd: float | None = None,
           baseline_costs_usd: dict[str, float] | None = None) -> bool:
    """Replace a row's reservation by the real usage; False if it was already settled.

    ``charged_usd`` is what the tenant's budget is charged; ``cost_usd`` the self-hosted cost of
    the request and ``baseline_costs_usd`` its price at each baseline API (None: not priced)."""
    with store.session() as s:
        res = s.execute(
            update(UsageRow)
            .where(UsageRow.request_id == record.request_id,
                   UsageRow.state.in_(("pending", "lost")))
            .values(state="settled", status_code=record.status_code,
                    error_code=record.error_code, prompt_tokens=record.prompt_tokens,
                    cached_prompt_tokens=record.cached_prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    charged_tokens=record.prompt_tokens + record.completion_tokens,
                    charged_usd=charged_usd, cost_usd=cost_usd,
                    baseline_costs_usd=baseline_costs_usd, ttft_s=record.ttft_s,
                    e2e_s=record.e2e_s, finished_at=utcnow(), lease_expires_at=None))
        return res.rowcount == 1


def renew_leases(store: TenancyStore, gateway_id: str, lease_s: float) -> int:
    """Extend the lease of this gateway's pending rows; returns how many."""
    with store.session() as s:
        return s.execute(update(UsageRow)
                         .where(UsageRow.gateway_id == gateway_id, UsageRow.state == "pending")
                         .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
                         ).rowcount


def close_lost(store: TenancyStore, now: dt.datetime | None = None) -> int:
    """Mark pending rows whose lease ran out as ``lost`` (their gateway died); returns how many."""
    now = now or utcnow()
    with store.session() as s:
        return s.execute(update(UsageRow)
                         .where(UsageRow.state == "pending", UsageRow.lease_expires_at < now)
                         .values(state="lost", error_code="gateway_lost", finished_at=now)
                         ).rowcount


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``2026-11-01``, ``2026-11-01T12:00:00[Z|+00:00]`` or a span back from now: ``30m``, ``24h``,
    ``7d``; returns naive UTC."""
    now = now or utcnow()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - dt.timedelta(seconds=float(t[:-1]) * units[t[-1]])
    try:
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 2026-11-01, an ISO time, or 30m/24h/7d)"
                         ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed
