"""Per-tenant counters that make every limit check cost the same whatever the ledger's size.

Each tenant has one ``tenant_counters`` row and, for the last minute, one ``rate_buckets`` row per
UTC second in which it started requests. Admission and settlement change them in the same
transaction as the ledger row they account for, so the counters always equal what the old
sliding-window queries over the ledger would have found:

* ``inflight``: ``pending`` rows (+1 at admission, -1 at settle of a pending row or when a lost
  gateway's row is closed);
* ``day_nusd`` / ``month_nusd`` / ``total_nusd``: ``charged_usd`` of rows started in the current
  UTC day / month / ever (the reservation until settled, then the real charge; a settle applies
  the difference to the period its row started in, so a late settle corrects the counters too).
  All three are kept whatever the tenant's ``budget_period``, so changing the period is exact;
* ``rate_buckets``: requests and ``charged_tokens`` per second of ``started_at``; requests/min
  and tokens/min are the sums over the 60 buckets of the current window.

Why one-second window buckets rather than GCRA or a token bucket: the limits keep the meaning
they had (at most N requests / T tokens started in any 60 s window, to one-second resolution), a
burst admits exactly the limit and no more, and a settle can move its real token count into the
very bucket its reservation went to, which a single GCRA "theoretical arrival time" cannot
attribute. A check reads at most 60 small rows by primary key: constant whatever the ledger's
size. Money is integer nano-USD, so counters add exactly.

Locking: the tenant's counters row is the tenant's lock (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` locks the file), taken before any ledger row, by every
writer, in tenant-id order within a batch (so concurrent gateways cannot deadlock).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from moestack.tenancy.store import period_start, sql

WINDOW_S = 60
EPOCH = dt.datetime(1970, 1, 1)


def epoch_second(t: dt.datetime) -> int:
    """The UTC second (since 1970) a naive UTC time falls in: its rate bucket."""
    return int((t - EPOCH) // dt.timedelta(seconds=1))


@dataclass
class Counters:
    """A tenant's counters as read (locked) at the start of a transaction."""

    tenant_id: int
    inflight: int
    day_start: dt.datetime
    day_nusd: int
    month_start: dt.datetime
    month_nusd: int
    total_nusd: int

    def roll(self, now: dt.datetime) -> None:
        """Move the day and month counters forward to the periods of ``now`` (never back: a
        gateway whose clock is behind another's across a period boundary admits into the
        newer period's counters, which only makes the check stricter)."""
        for period in ("day", "month"):
            start = period_start(period, now)
            if start > getattr(self, f"{period}_start"):
                setattr(self, f"{period}_start", start)
                setattr(self, f"{period}_nusd", 0)

    def add(self, started_at: dt.datetime, nusd: int) -> None:
        """Add ``nusd`` to the counters of the periods ``started_at`` is in."""
        self.total_nusd += nusd
        if period_start("day", started_at) == self.day_start:
            self.day_nusd += nusd
        if period_start("month", started_at) == self.month_start:
            self.month_nusd += nusd

    def spent_nusd(self, period: str) -> int:
        return {"day": self.day_nusd, "month": self.month_nusd}.get(period, self.total_nusd)


_LOCK = {d: sql("SELECT tenant_id, inflight, day_start, day_nusd, month_start, month_nusd, "
                "total_nusd FROM tenant_counters WHERE tenant_id = :t" + suffix,
                columns=("tenant_id", "inflight", "day_start", "day_nusd", "month_start",
                         "month_nusd", "total_nusd"), time_columns=("day_start", "month_start"))
         for d, suffix in (("postgresql", " FOR UPDATE"), ("sqlite", ""))}
_WRITE = sql("UPDATE tenant_counters SET inflight = :inflight, day_start = :day_start, "
              "day_nusd = :day_nusd, month_start = :month_start, month_nusd = :month_nusd, "
              "total_nusd = :total_nusd WHERE tenant_id = :tenant_id",
             times=("day_start", "month_start"))
_WINDOW = sql("SELECT second, requests, tokens FROM rate_buckets WHERE tenant_id = :t AND "
               "second > :after ORDER BY second")
_BUCKET_ADD = sql("INSERT INTO rate_buckets (tenant_id, second, requests, tokens) VALUES "
                   "(:t, :s, 1, :tokens) ON CONFLICT (tenant_id, second) DO UPDATE SET "
                   "requests = rate_buckets.requests + 1, "
                   "tokens = rate_buckets.tokens + excluded.tokens")
_BUCKET_CORRECT = sql("UPDATE rate_buckets SET tokens = tokens + :d WHERE tenant_id = :t AND "
                       "second = :s")
_APPLY = sql("UPDATE tenant_counters SET inflight = inflight + :inflight, "
              "total_nusd = total_nusd + :d, "
              "day_nusd = day_nusd + CASE WHEN day_start = :day THEN :d ELSE 0 END, "
              "month_nusd = month_nusd + CASE WHEN month_start = :month THEN :d ELSE 0 END "
              "WHERE tenant_id = :t", times=("day", "month"))
_EXPIRE = sql("DELETE FROM rate_buckets WHERE second < :before")


_LOCK_MANY = sql("SELECT tenant_id FROM tenant_counters WHERE tenant_id IN :ids ORDER BY "
                 "tenant_id FOR UPDATE", lists=("ids",))


def lock_many(conn: Connection, tenant_ids) -> None:
    """Lock several tenants' counters in tenant-id order (PostgreSQL; SQLite's transaction
    already holds the file's write lock): the lock order every writer follows."""
    ids = sorted(set(tenant_ids))
    if ids and conn.dialect.name == "postgresql":
        conn.execute(_LOCK_MANY, {"ids": ids}).all()


_LOCK_ALL = {d: sql("SELECT tenant_id, inflight, day_start, day_nusd, month_start, month_nusd, "
                    "total_nusd FROM tenant_counters WHERE tenant_id IN :ids ORDER BY tenant_id"
                    + suffix, columns=("tenant_id", "inflight", "day_start", "day_nusd",
                                       "month_start", "month_nusd", "total_nusd"),
                    time_columns=("day_start", "month_start"), lists=("ids",))
             for d, suffix in (("postgresql", " FOR UPDATE"), ("sqlite", ""))}
_WINDOWS = sql("SELECT tenant_id, second, requests, tokens FROM rate_buckets WHERE tenant_id IN "
               ":ids AND second > :after", lists=("ids",))
_BUCKETS_ADD = sql("INSERT INTO rate_buckets (tenant_id, second, requests, tokens) VALUES "
                   "(:t, :s, :requests, :tokens) ON CONFLICT (tenant_id, second) DO UPDATE SET "
                   "requests = rate_buckets.requests + excluded.requests, "
                   "tokens = rate_buckets.tokens + excluded.tokens")


def lock_all(conn: Connection, tenant_ids: list[int]) -> dict[int, Counters]:
    """Lock (in tenant-id order) and read several tenants' counters; tenants that do not exist
    are missing from the result."""
    if not tenant_ids:
        return {}
    stmt = _LOCK_ALL.get(conn.dialect.name, _LOCK_ALL["sqlite"])
    return {row[0]: Counters(*row) for row in conn.execute(stmt, {"ids": sorted(tenant_ids)})}


def windows(conn: Connection, tenant_ids: list[int], now: dt.datetime
            ) -> dict[int, dict[int, list[int]]]:
    """Per tenant, ``second -> [requests, tokens]`` of the buckets in the window ending at
    ``now`` (or later), in one query."""
    out: dict[int, dict[int, list[int]]] = {t: {} for t in tenant_ids}
    if tenant_ids:
        for t, second, requests, tokens in conn.execute(
                _WINDOWS, {"ids": tenant_ids, "after": epoch_second(now) - WINDOW_S}):
            out[t][second] = [requests, tokens]
    return out


def write_all(conn: Connection, held: list[Counters]) -> None:
    """Write back counters read by :func:`lock_all` and changed in place (one statement)."""
    if held:
        conn.execute(_WRITE, [c.__dict__ for c in held])


def add_buckets(conn: Connection, added: dict[tuple[int, int], list[int]]) -> None:
    """Add ``(tenant, second) -> [requests, tokens]`` to the window buckets (one statement)."""
    if added:
        conn.execute(_BUCKETS_ADD, [{"t": t, "s": s, "requests": r, "tokens": k}
                                    for (t, s), (r, k) in sorted(added.items())])


def lock(conn: Connection, tenant_id: int) -> Counters | None:
    """Lock and read a tenant's counters (None: no such tenant)."""
    row = conn.execute(_LOCK.get(conn.dialect.name, _LOCK["sqlite"]), {"t": tenant_id}).first()
    return Counters(*row) if row else None


def window(conn: Connection, tenant_id: int, now: dt.datetime) -> list[tuple[int, int, int]]:
    """``(second, requests, tokens)`` of the buckets in the window ending at ``now``, oldest
    first."""
    return [tuple(r) for r in conn.execute(
        _WINDOW, {"t": tenant_id, "after": epoch_second(now) - WINDOW_S})]


def reserve(conn: Connection, c: Counters, now: dt.datetime, tokens: int, nusd: int) -> None:
    """Count an admitted request: one more in flight, its reservation in its periods and in
    the window bucket of ``now`` (``c`` must be locked and rolled to ``now``)."""
    c.inflight += 1
    c.add(now, nusd)
    conn.execute(_WRITE, c.__dict__)
    conn.execute(_BUCKET_ADD, {"t": c.tenant_id, "s": epoch_second(now), "tokens": tokens})


class Corrections:
    """Settlements' differences summed per tenant and period, and per bucket, written with one
    statement each (a batch of settlements costs a few statements, not a few per row)."""

    def __init__(self):
        self.periods: dict[tuple, list[int]] = {}
        self.buckets: dict[tuple, int] = {}

    def add(self, tenant_id: int, started_at: dt.datetime, inflight: int, d_tokens: int,
            d_nusd: int) -> None:
        key = (tenant_id, period_start("day", started_at), period_start("month", started_at))
        acc = self.periods.setdefault(key, [0, 0])
        acc[0] += inflight
        acc[1] += d_nusd
        if d_tokens:
            b = (tenant_id, epoch_second(started_at))
            self.buckets[b] = self.buckets.get(b, 0) + d_tokens

    def write(self, conn: Connection) -> None:
        if self.periods:
            conn.execute(_APPLY, [{"t": t, "day": day, "month": month, "inflight": i, "d": d}
                                  for (t, day, month), (i, d) in self.periods.items()])
        if self.buckets:
            conn.execute(_BUCKET_CORRECT, [{"t": t, "s": s, "d": d}
                                           for (t, s), d in self.buckets.items()])


def release_lost(conn: Connection, tenant_id: int, rows: int) -> None:
    """``rows`` pending rows of the tenant were closed as lost: no longer in flight (their
    reservations stay charged)."""
    conn.execute(_APPLY, {"t": tenant_id, "inflight": -rows, "d": 0, "day": EPOCH,
                          "month": EPOCH})


def expire_buckets(conn: Connection, now: dt.datetime) -> int:
    """Drop buckets no window can reach any more (background)."""
    return conn.execute(_EXPIRE, {"before": epoch_second(now) - 2 * WINDOW_S}).rowcount
