"""Hourly usage rollups, kept incrementally in the transactions that write the ledger.

One ``usage_rollups`` row per tenant, model, endpoint and UTC hour of ``started_at`` holds the sums
of that hour's ledger rows: admission adds the request and its reservation, a settle adds the real
token counts, self-hosted cost and baseline prices and moves the charge from the reservation to the
real figure (a lost row keeps its reservation, as in the ledger). Money is integer nano-USD, so a
rollup equals its raw rows exactly (:func:`aggregate` sums raw rows the same way; the tests compare
the two). Rows settled without baseline prices have their tokens summed apart (``unpriced_*``) for
the reader to price with its catalog. Raw rows may be deleted after the retention period; rollups
are kept, and ``moestack usage``, ``moestack cost report`` and ``GET /v1/usage`` read them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from moestack.tenancy.batch_sql import Statements
from moestack.tenancy.store import TenancyStore, sql
from moestack.usage import NUSD_PER_USD, to_nusd

SUM_FIELDS = ("requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
              "charged_tokens", "charged_nusd", "cost_nusd", "unpriced_prompt_tokens",
              "unpriced_cached_prompt_tokens", "unpriced_completion_tokens")


def hour_of(t: dt.datetime) -> dt.datetime:
    return dt.datetime(t.year, t.month, t.day, t.hour, tzinfo=t.tzinfo)


@dataclass
class Rollup:
    """Sums of one tenant's ledger rows of one model, endpoint and UTC hour."""

    tenant: str
    model: str
    endpoint: str
    hour: dt.datetime
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    charged_tokens: int = 0
    charged_nusd: int = 0
    cost_nusd: int = 0
    unpriced_prompt_tokens: int = 0
    unpriced_cached_prompt_tokens: int = 0
    unpriced_completion_tokens: int = 0
    baselines_nusd: dict[str, int] = field(default_factory=dict)

    @property
    def charged_usd(self) -> float:
        return self.charged_nusd / NUSD_PER_USD

    @property
    def cost_usd(self) -> float:
        return self.cost_nusd / NUSD_PER_USD

    def tenant_view(self) -> dict:
        """What a tenant sees of its own usage: tokens and charges, no operator cost figures."""
        return {"hour": self.hour.isoformat() + "Z", "model": self.model,
                "endpoint": self.endpoint, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "charged_tokens": self.charged_tokens, "charged_usd": self.charged_usd}


_UPSERT_PARTS = (
    "INSERT INTO usage_rollups (tenant_id, model, endpoint, hour, " + ", ".join(SUM_FIELDS) + ")",
    "(:t, :model, :endpoint, :hour, " + ", ".join(f":{f}" for f in SUM_FIELDS) + ")",
    "ON CONFLICT (tenant_id, model, endpoint, hour) DO UPDATE SET "
    + ", ".join(f"{f} = usage_rollups.{f} + excluded.{f}" for f in SUM_FIELDS))
_UPSERT_BASELINE_PARTS = (
    "INSERT INTO usage_rollup_baselines (tenant_id, model, endpoint, hour, baseline, nusd)",
    "(:t, :model, :endpoint, :hour, :baseline, :nusd)",
    "ON CONFLICT (tenant_id, model, endpoint, hour, baseline) DO UPDATE SET "
    "nusd = usage_rollup_baselines.nusd + excluded.nusd")
_UPSERT = sql(" VALUES ".join(_UPSERT_PARTS[:2]) + " " + _UPSERT_PARTS[2], times=("hour",))
_UPSERT_BASELINE = sql(" VALUES ".join(_UPSERT_BASELINE_PARTS[:2]) + " "
                       + _UPSERT_BASELINE_PARTS[2], times=("hour",))


def add(conn: Connection, tenant_id: int, model: str, endpoint: str, started_at: dt.datetime,
        baselines_nusd: Mapping[str, int] | None = None, **sums: int) -> None:
    """Add ``sums`` (keys of ``SUM_FIELDS``, others 0) and baseline prices to a rollup row."""
    key = {"t": tenant_id, "model": model, "endpoint": endpoint, "hour": hour_of(started_at)}
    conn.execute(_UPSERT, {**key, **dict.fromkeys(SUM_FIELDS, 0), **sums})
    if baselines_nusd:
        conn.execute(_UPSERT_BASELINE, [{**key, "baseline": b, "nusd": n}
                                        for b, n in baselines_nusd.items()])


class RollupDeltas:
    """Additions to rollup rows summed per key, written with one statement per table."""

    def __init__(self):
        self.sums: dict[tuple, dict[str, int]] = {}
        self.baselines: dict[tuple, int] = {}

    def add(self, tenant_id: int, model: str, endpoint: str, started_at: dt.datetime,
            baselines_nusd: Mapping[str, int] | None = None, **sums: int) -> None:
        key = (tenant_id, model, endpoint, hour_of(started_at))
        acc = self.sums.setdefault(key, dict.fromkeys(SUM_FIELDS, 0))
        for f, v in sums.items():
            acc[f] += v
        for b, n in (baselines_nusd or {}).items():
            self.baselines[(*key, b)] = self.baselines.get((*key, b), 0) + n

    def write(self, db: Statements) -> None:
        """Queue the upserts of the sums (one statement each on PostgreSQL)."""
        db.insert(*_UPSERT_PARTS[:2], [
            {"t": t, "model": m, "endpoint": e, "hour": db.time(h), **v}
            for (t, m, e, h), v in sorted(self.sums.items())], _UPSERT_PARTS[2])
        db.insert(*_UPSERT_BASELINE_PARTS[:2], [
            {"t": t, "model": m, "endpoint": e, "hour": db.time(h), "baseline": b, "nusd": n}
            for (t, m, e, h, b), n in sorted(self.baselines.items())],
            _UPSERT_BASELINE_PARTS[2])


def query(store: TenancyStore, tenant: str | None = None, since: dt.datetime | None = None,
          until: dt.datetime | None = None) -> list[Rollup]:
    """Rollups of hours starting in ``[since, until)`` (``since`` rounds down to its hour),
    ordered by hour, tenant, model, endpoint."""
    where, params = ["1 = 1"], {}
    if tenant is not None:
        where.append("t.name = :tenant")
        params["tenant"] = tenant
    if since is not None:
        where.append("r.hour >= :since")
        params["since"] = hour_of(since)
    if until is not None:
        where.append("r.hour < :until")
        params["until"] = until
    cond = " AND ".join(where)
    sums = ", ".join(f"r.{f}" for f in SUM_FIELDS)
    with store.read() as conn:
        times = tuple(k for k in ("since", "until") if k in params)
        rows = conn.execute(sql(
            f"SELECT t.name, r.model, r.endpoint, r.hour, {sums} FROM usage_rollups r JOIN "
            f"tenants t ON t.id = r.tenant_id WHERE {cond} ORDER BY r.hour, t.name, r.model, "
            "r.endpoint", times, ("name", "model", "endpoint", "hour", *SUM_FIELDS), ("hour",)),
            params).all()
        baselines = conn.execute(sql(
            "SELECT t.name, r.model, r.endpoint, r.hour, r.baseline, r.nusd FROM "
            f"usage_rollup_baselines r JOIN tenants t ON t.id = r.tenant_id WHERE {cond}",
            times, ("name", "model", "endpoint", "hour", "baseline", "nusd"), ("hour",)),
            params).all()
    out = {tuple(r[:4]): Rollup(*r) for r in rows}
    for name, model, endpoint, hour, baseline, nusd in baselines:
        if (key := (name, model, endpoint, hour)) in out:
            out[key].baselines_nusd[baseline] = nusd
    return list(out.values())


def aggregate(rows: Iterable) -> list[Rollup]:
    """Sum raw ledger rows (:class:`~moestack.tenancy.ledger.LedgerEntry`) into rollups, exactly
    as the store maintains them (the reference the rollups are checked against)."""
    out: dict[tuple, Rollup] = {}
    for r in rows:
        key = (r.tenant, r.model, r.endpoint, hour_of(r.started_at))
        roll = out.setdefault(key, Rollup(*key))
        roll.requests += 1
        roll.prompt_tokens += r.prompt_tokens
        roll.cached_prompt_tokens += r.cached_prompt_tokens
        roll.completion_tokens += r.completion_tokens
        roll.charged_tokens += r.charged_tokens
        roll.charged_nusd += to_nusd(r.charged_usd)
        roll.cost_nusd += to_nusd(r.cost_usd)
        if r.state != "settled":
            continue
        if r.baseline_costs_usd is None:
            roll.unpriced_prompt_tokens += r.prompt_tokens
            roll.unpriced_cached_prompt_tokens += r.cached_prompt_tokens
            roll.unpriced_completion_tokens += r.completion_tokens
        else:
            for b, usd in r.baseline_costs_usd.items():
                roll.baselines_nusd[b] = roll.baselines_nusd.get(b, 0) + to_nusd(usd)
    return sorted(out.values(), key=lambda x: (x.hour, x.tenant, x.model, x.endpoint))
