"""The usage ledger: one row per admitted request, written ahead, settled exactly once.

Life of a row: :func:`moestack.tenancy.admission.admit_in` inserts it as ``pending`` with the
reservation (``charged_* = reserved_*``) and a lease; :func:`settle_many` replaces the reservation
with the real counts in a conditional update, so settling twice changes nothing (idempotent by
request id), and applies the difference to the tenant's counters (:mod:`.counters`) and the hourly
rollup (:mod:`.rollups`) in the same transaction. While the request runs its gateway renews the
lease (:func:`renew_leases`); if the gateway is killed, :func:`close_lost` marks the row ``lost``
once the lease ran out, keeping the reservation as the charge (an upper bound, so a crash can never
let a tenant overspend) and taking it out of the tenant's in-flight count. A late settle of a
``lost`` row still replaces the reservation by the real figures, in the row and the counters.
A settlement the store refuses on its own (not an outage) closes its row at once as ``lost`` with
``error_code`` ``settle_failed`` (:func:`close_unsettled`), and the lease renewal covers only the
requests still running, so no row stays ``pending`` for as long as its gateway lives.
Requests refused before admission (401/404/429/503) have no row; they are counted in metrics.
Finished rows older than ``tenancy.raw_usage_retention_days`` are deleted by :func:`purge_raw`;
the rollups keep their sums.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from moestack.tenancy import counters, rollups
from moestack.tenancy.batch_sql import Statements
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.tables import Tenant, UsageRow, utcnow
from moestack.usage import NUSD_PER_USD, RequestRecord, to_nusd


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
    adapter: str | None = None
    """The LoRA adapter the request ran with (``model`` is its base), set when it settles."""
    backend: str = "replica"
    """Who answered: ``replica`` (self-hosted) or ``provider:<name>`` (overflow)."""


def query_usage(store: TenancyStore, tenant: str | None = None, since: dt.datetime | None = None,
                until: dt.datetime | None = None, limit: int | None = None) -> list[LedgerEntry]:
    """Ledger rows, oldest first; filters are ANDed; datetimes are naive UTC."""
    q = select(*UsageRow.__table__.columns, Tenant.name).join(Tenant, Tenant.id == UsageRow.tenant_id)
    if tenant is not None:
        q = q.where(Tenant.name == tenant)
    if since is not None:
        q = q.where(UsageRow.started_at >= since)
    if until is not None:
        q = q.where(UsageRow.started_at < until)
    q = q.order_by(UsageRow.started_at, UsageRow.request_id)
    if limit is not None:
        q = q.limit(limit)
    with store.read() as conn:
        return [_entry(UsageRow(**dict(zip(_COLUMNS, row[:-1]))), row[-1])
                for row in conn.execute(q)]


_COLUMNS = [c.key for c in UsageRow.__table__.columns]


def _entry(r: UsageRow, tenant: str) -> LedgerEntry:
    return LedgerEntry(
        r.request_id, tenant, r.key_id, r.model, r.endpoint, r.stream, r.state, r.status_code,
        r.error_code, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens,
        r.charged_tokens, r.charged_usd, r.cost_usd, r.baseline_costs_usd, r.ttft_s, r.e2e_s,
        r.started_at, r.finished_at, r.adapter, r.backend or "replica")


@dataclass(frozen=True)
class Settlement:
    """A finished request's figures, priced, ready to be written to its ledger row."""

    record: RequestRecord
    charged_usd: float
    cost_usd: float | None = None
    baseline_costs_usd: dict[str, float] | None = None


_LOCK_TENANTS_OF = ("SELECT tenant_id FROM tenant_counters WHERE tenant_id IN (SELECT "
                    "tenant_id FROM usage_ledger WHERE request_id IN :ids) ORDER BY tenant_id "
                    "FOR UPDATE")
"""PostgreSQL: lock the counters of the rows' tenants, in tenant-id order (sent with the rows'
read, in the same round trip)."""
_ROWS = ("SELECT request_id, tenant_id, model, endpoint, state, started_at, charged_tokens, "
         "charged_usd FROM usage_ledger WHERE request_id IN :ids")
_SETTLE = (
    "UPDATE usage_ledger SET state = 'settled', status_code = :status_code, error_code = "
    ":error_code, prompt_tokens = :prompt_tokens, cached_prompt_tokens = :cached_prompt_tokens, "
    "completion_tokens = :completion_tokens, charged_tokens = :charged_tokens, charged_usd = "
    ":charged_usd, cost_usd = :cost_usd, baseline_costs_usd = :baselines, ttft_s = :ttft_s, "
    "e2e_s = :e2e_s, finished_at = :finished_at, lease_expires_at = NULL, adapter = :adapter "
    "WHERE request_id = :id AND state IN ('pending', 'lost')")
_SETTLE_COLUMNS = ("id", "status_code", "error_code", "prompt_tokens", "cached_prompt_tokens",
                   "completion_tokens", "charged_tokens", "charged_usd", "cost_usd", "baselines",
                   "ttft_s", "e2e_s", "finished_at", "adapter")
_SETTLE_VALUES = ("UPDATE usage_ledger AS u SET state = 'settled', "
                  "status_code = v.status_code::integer, error_code = v.error_code::varchar, "
                  "prompt_tokens = v.prompt_tokens::bigint, "
                  "cached_prompt_tokens = v.cached_prompt_tokens::bigint, "
                  "completion_tokens = v.completion_tokens::bigint, "
                  "charged_tokens = v.charged_tokens::bigint, "
                  "charged_usd = v.charged_usd::float8, cost_usd = v.cost_usd::float8, "
                  "baseline_costs_usd = v.baselines::json, ttft_s = v.ttft_s::float8, "
                  "e2e_s = v.e2e_s::float8, finished_at = v.finished_at::timestamp, "
                  "lease_expires_at = NULL, adapter = v.adapter::varchar FROM (",
                  "(" + ", ".join(f":{c}" for c in _SETTLE_COLUMNS) + ")",
                  f") AS v({', '.join(_SETTLE_COLUMNS)}) WHERE u.request_id = v.id::varchar "
                  "AND u.state IN ('pending', 'lost')")
"""PostgreSQL: :data:`_SETTLE` of a whole batch as one statement."""


def settle(store: TenancyStore, record: RequestRecord, charged_usd: float,
           cost_usd: float | None = None,
           baseline_costs_usd: dict[str, float] | None = None) -> bool:
    """:func:`settle_many` of one settlement in a transaction of its own."""
    with store.begin() as conn:
        return settle_many(conn, [Settlement(record, charged_usd, cost_usd,
                                             baseline_costs_usd)])[0]


def settle_many(conn: Connection, items: list[Settlement]) -> list[bool]:
    """Replace rows' reservations by the real usage and apply the differences to the tenants'
    counters and the hourly rollups; per item, False (changing nothing) if its row was already
    settled (earlier or in this batch) or is gone. ``charged_usd`` is what the tenant's budget is
    charged; ``cost_usd`` the self-hosted cost and ``baseline_costs_usd`` the price at each
    baseline API (None: not priced). The tenants' counters are locked before the rows (the
    writers' lock order). A batch costs a few statements whatever its size."""
    db = Statements.of(conn)
    ids = list(dict.fromkeys(s.record.request_id for s in items))
    before = [(_LOCK_TENANTS_OF, {"ids": ids}, ("ids",))] if db.postgresql else []
    # PostgreSQL: the rows are read (and locked) by a statement after the counters' lock, so
    # they are as the last transaction holding that lock left them.
    rows = {r[0]: _Held(*r[:5], db.read_time(r[5]), *r[6:]) for r in db.read(
        _ROWS + (" FOR UPDATE" if db.postgresql else ""), {"ids": ids}, ("ids",), before)}
    done, updates, results = set(), [], []
    corrections, deltas = counters.Corrections(), rollups.RollupDeltas()
    finished_at = db.time(utcnow())
    for s in items:
        rec, row = s.record, rows.get(s.record.request_id)
        if row is None or row.state not in ("pending", "lost") or rec.request_id in done:
            results.append(False)
            continue
        done.add(rec.request_id)
        results.append(True)
        charged_nusd = to_nusd(s.charged_usd)
        charged_tokens = rec.prompt_tokens + rec.completion_tokens
        baselines = ({b: to_nusd(usd) for b, usd in s.baseline_costs_usd.items()}
                     if s.baseline_costs_usd is not None else None)
        updates.append({
            "id": rec.request_id, "status_code": rec.status_code, "error_code": rec.error_code,
            "prompt_tokens": rec.prompt_tokens, "cached_prompt_tokens": rec.cached_prompt_tokens,
            "completion_tokens": rec.completion_tokens, "charged_tokens": charged_tokens,
            "charged_usd": charged_nusd / NUSD_PER_USD,
            "cost_usd": None if s.cost_usd is None else to_nusd(s.cost_usd) / NUSD_PER_USD,
            "baselines": db.json(None if baselines is None else
                                 {b: n / NUSD_PER_USD for b, n in baselines.items()}),
            "ttft_s": rec.ttft_s, "e2e_s": rec.e2e_s, "finished_at": finished_at,
            "adapter": rec.adapter})
        d_tokens = charged_tokens - row.charged_tokens
        d_nusd = charged_nusd - to_nusd(row.charged_usd)
        corrections.add(row.tenant_id, row.started_at, -1 if row.state == "pending" else 0,
                        d_tokens, d_nusd)
        unpriced = {} if baselines is not None else {
            "unpriced_prompt_tokens": rec.prompt_tokens,
            "unpriced_cached_prompt_tokens": rec.cached_prompt_tokens,
            "unpriced_completion_tokens": rec.completion_tokens}
        deltas.add(row.tenant_id, row.model, row.endpoint, row.started_at, baselines,
                   prompt_tokens=rec.prompt_tokens,
                   cached_prompt_tokens=rec.cached_prompt_tokens,
                   completion_tokens=rec.completion_tokens, charged_tokens=d_tokens,
                   charged_nusd=d_nusd, cost_nusd=to_nusd(s.cost_usd), **unpriced)
    if updates:
        db.write_values(*_SETTLE_VALUES, updates, _SETTLE)
        corrections.write(db)
        deltas.write(db)
        db.done()
    return results


@dataclass(frozen=True)
class _Held:
    """A ledger row as a settlement reads it."""

    request_id: str
    tenant_id: int
    model: str
    endpoint: str
    state: str
    started_at: dt.datetime
    charged_tokens: int
    charged_usd: float


RENEW_BATCH_IDS = 1000


def renew_leases(conn: Connection, gateway_id: str, lease_s: float,
                 request_ids: list[str] | None = None) -> int:
    """Extend the lease of this gateway's pending rows (only those of ``request_ids``, the
    requests still running, when given); returns how many."""
    lease = utcnow() + dt.timedelta(seconds=lease_s)
    q = update(UsageRow).where(UsageRow.gateway_id == gateway_id, UsageRow.state == "pending")
    if request_ids is None:
        return conn.execute(q.values(lease_expires_at=lease)).rowcount
    return sum(conn.execute(q.where(UsageRow.request_id.in_(request_ids[i:i + RENEW_BATCH_IDS]))
                            .values(lease_expires_at=lease)).rowcount
               for i in range(0, len(request_ids), RENEW_BATCH_IDS))


def close_unsettled(conn: Connection, request_ids: list[str],
                    now: dt.datetime | None = None) -> int:
    """Close pending rows whose settlement could not be written (it failed on its own, not
    for a store outage) as ``lost`` with ``error_code`` ``settle_failed``, keeping their
    reservation as the charge, and take them out of the in-flight counters; returns how many."""
    pending = (UsageRow.state == "pending",)
    rows = conn.execute(select(UsageRow.request_id, UsageRow.tenant_id)
                        .where(UsageRow.request_id.in_(request_ids), *pending))
    return _close_as_lost(conn, rows, pending, now or utcnow(), error_code="settle_failed",
                          lease_expires_at=None)


CLOSE_BATCH_ROWS = 1000


def close_lost(conn: Connection, now: dt.datetime | None = None) -> int:
    """Mark pending rows whose lease ran out as ``lost`` (their gateway died), keeping their
    reservation as the charge, and take them out of their tenants' in-flight counters; returns
    how many (at most ``CLOSE_BATCH_ROWS`` per call; the beat calls again). Uses the
    ``(state, lease_expires_at)`` index: the cost grows with the expired rows, not the ledger."""
    now = now or utcnow()
    expired = (UsageRow.state == "pending", UsageRow.lease_expires_at < now)
    rows = conn.execute(select(UsageRow.request_id, UsageRow.tenant_id).where(*expired)
                        .limit(CLOSE_BATCH_ROWS)).all()
    return _close_as_lost(conn, rows, expired, now, error_code="gateway_lost")


def _close_as_lost(conn: Connection, rows, still, now: dt.datetime, **values) -> int:
    """Mark ``rows`` ((request id, tenant id) pairs) that still match the conditions ``still``
    as ``lost`` with ``values``, tenant by tenant in id order with the tenant's counters row
    locked first (as admission does), and take them out of the in-flight counters."""
    by_tenant: dict[int, list[str]] = {}
    for request_id, tenant_id in rows:
        by_tenant.setdefault(tenant_id, []).append(request_id)
    closed = 0
    for tenant_id in sorted(by_tenant):
        counters.lock(conn, tenant_id)
        n = conn.execute(update(UsageRow)
                         .where(UsageRow.request_id.in_(by_tenant[tenant_id]), *still)
                         .values(state="lost", finished_at=now, **values)).rowcount
        counters.release_lost(conn, tenant_id, n)
        closed += n
    return closed


PURGE_BATCH_ROWS = 5000


def purge_raw(conn: Connection, retention_days: float, now: dt.datetime | None = None) -> int:
    """Delete finished raw rows started more than ``retention_days`` ago (rollups keep their
    sums); at most ``PURGE_BATCH_ROWS`` per call. Returns how many."""
    cutoff = (now or utcnow()) - dt.timedelta(days=retention_days)
    old = select(UsageRow.request_id).where(UsageRow.started_at < cutoff,
                                            UsageRow.state != "pending"
                                            ).limit(PURGE_BATCH_ROWS).scalar_subquery()
    return conn.execute(delete(UsageRow).where(UsageRow.request_id.in_(old))).rowcount


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``2026-11-01``, ``2026-11-01T12:00:00[Z|+00:00]`` or a span back from now: ``30m``, ``24h``,
    ``7d``; returns naive UTC. Anything else, or a time outside years 1-9999, is a ValueError
    (the API answers 400, the CLI exits 2)."""
    now = now or utcnow()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    try:
        if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
            return now - dt.timedelta(seconds=float(t[:-1]) * units[t[-1]])
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise ValueError(f"not a time: {text[:64]!r} (use 2026-11-01, an ISO time between years "
                         "1 and 9999, or a span back such as 30m/24h/7d)") from None
    return parsed
