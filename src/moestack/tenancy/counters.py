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

from moestack.tenancy.batch_sql import Statements
from moestack.tenancy.store import sql

WINDOW_S = 60
EPOCH = dt.datetime(1970, 1, 1)


def epoch_second(t: dt.datetime) -> int:
    """The UTC second (since 1970) a naive UTC time falls in: its rate bucket."""
    d = t - EPOCH
    return d.days * 86400 + d.seconds


def day_and_month(t: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """Starts of the UTC day and month ``t`` is in (``period_start`` of both, cheaper)."""
    return dt.datetime(t.year, t.month, t.day), dt.datetime(t.year, t.month, 1)


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
        day, month = day_and_month(now)
        if day > self.day_start:
            self.day_start, self.day_nusd = day, 0
        if month > self.month_start:
            self.month_start, self.month_nusd = month, 0

    def add(self, started_at: dt.datetime, nusd: int) -> None:
        """Add ``nusd`` to the counters of the periods ``started_at`` is in."""
        self.total_nusd += nusd
        day, month = day_and_month(started_at)
        if day == self.day_start:
            self.day_nusd += nusd
        if month == self.month_start:
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
_BUCKET_CORRECT_SQL = ("UPDATE rate_buckets SET tokens = tokens + :d WHERE tenant_id = :t AND "
                       "second = :s")
_APPLY_SQL = ("UPDATE tenant_counters SET inflight = inflight + :inflight, "
              "total_nusd = total_nusd + :d, "
              "day_nusd = day_nusd + CASE WHEN day_start = :day THEN :d ELSE 0 END, "
              "month_nusd = month_nusd + CASE WHEN month_start = :month THEN :d ELSE 0 END "
              "WHERE tenant_id = :t")
_APPLY = sql(_APPLY_SQL, times=("day", "month"))
_EXPIRE = sql("DELETE FROM rate_buckets WHERE second < :before")


_LOCK_MANY = sql("SELECT tenant_id FROM tenant_counters WHERE tenant_id IN :ids ORDER BY "
                 "tenant_id FOR UPDATE", lists=("ids",))


def lock_many(conn: Connection, tenant_ids) -> None:
    """Lock several tenants' counters in tenant-id order (PostgreSQL; SQLite's transaction
    already holds the file's write lock): the lock order every writer follows."""
    ids = sorted(set(tenant_ids))
    if ids and conn.dialect.name == "postgresql":
        conn.execute(_LOCK_MANY, {"ids": ids}).all()


LOCK_IDS = ("SELECT tenant_id FROM tenant_counters WHERE tenant_id IN :ids ORDER BY tenant_id "
            "FOR UPDATE")
"""PostgreSQL: lock the counters rows of tenants ``:ids`` in tenant-id order (SQLite's
``BEGIN IMMEDIATE`` already holds the file's write lock)."""
_READ_ALL = ("SELECT 0, tenant_id, inflight, day_start, day_nusd, month_start, month_nusd, "
             "total_nusd, NULL, NULL, NULL, NULL FROM tenant_counters WHERE tenant_id IN :ids")
_READ_WINDOWS = ("SELECT 1, tenant_id, NULL, NULL, NULL, NULL, NULL, NULL, second, requests, "
                 "tokens, NULL FROM rate_buckets WHERE tenant_id IN :windowed AND second > :after")
_WRITE_SQL = ("UPDATE tenant_counters SET inflight = :inflight, day_start = :day_start, "
              "day_nusd = :day_nusd, month_start = :month_start, month_nusd = :month_nusd, "
              "total_nusd = :total_nusd WHERE tenant_id = :tenant_id")
_BUCKETS_ADD = ("INSERT INTO rate_buckets (tenant_id, second, requests, tokens)",
                "(:t, :s, :requests, :tokens)",
                "ON CONFLICT (tenant_id, second) DO UPDATE SET "
                "requests = rate_buckets.requests + excluded.requests, "
                "tokens = rate_buckets.tokens + excluded.tokens")


def read_locked(db: Statements, tenant_ids: list[int], windowed: list[int], now: dt.datetime,
                extra: tuple[str, dict, tuple[str, ...]] | None = None
                ) -> tuple[dict[int, Counters], dict[int, dict[int, list[int]]], list[tuple]]:
    """Lock (PostgreSQL, in tenant-id order) and read the counters of ``tenant_ids`` (tenants
    that do not exist are missing), and the window buckets ending at ``now`` (or later) of
    ``windowed`` (per tenant, ``second -> [requests, tokens]``), in one round trip; with
    ``extra`` (a ``SELECT`` of 12 columns, the first a constant 2 or more, and its parameters
    and list parameters), also that statement's rows."""
    held: dict[int, Counters] = {}
    buckets: dict[int, dict[int, list[int]]] = {t: {} for t in windowed}
    if not tenant_ids:
        return held, buckets, []
    statement, params, lists = _READ_ALL, {"ids": tenant_ids}, ["ids"]
    if windowed:
        statement += " UNION ALL " + _READ_WINDOWS
        params.update(windowed=windowed, after=epoch_second(now) - WINDOW_S)
        lists.append("windowed")
    if extra is not None:
        statement += " UNION ALL " + extra[0]
        params.update(extra[1])
        lists.extend(extra[2])
    before = [(LOCK_IDS, {"ids": tenant_ids}, ("ids",))] if db.postgresql else []
    rest = []
    for row in db.read(statement, params, lists, before):
        kind = row[0]
        if kind == 0:
            held[row[1]] = Counters(row[1], row[2], db.read_time(row[3]), row[4],
                                    db.read_time(row[5]), row[6], row[7])
        elif kind == 1:
            buckets[row[1]][row[8]] = [row[9], row[10]]
        else:
            rest.append(row)
    return held, buckets, rest


def write_all(db: Statements, held: list[Counters]) -> None:
    """Write back counters read by :func:`read_locked` and changed in place."""
    db.write(_WRITE_SQL, [{"inflight": c.inflight, "day_start": db.time(c.day_start),
                           "day_nusd": c.day_nusd, "month_start": db.time(c.month_start),
                           "month_nusd": c.month_nusd, "total_nusd": c.total_nusd,
                           "tenant_id": c.tenant_id} for c in held])


def add_buckets(db: Statements, added: dict[tuple[int, int], list[int]]) -> None:
    """Add ``(tenant, second) -> [requests, tokens]`` to the window buckets (one statement)."""
    head, values, tail = _BUCKETS_ADD
    db.insert(head, values, [{"t": t, "s": s, "requests": r, "tokens": k}
                             for (t, s), (r, k) in sorted(added.items())], tail)


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
        key = (tenant_id, *day_and_month(started_at))
        acc = self.periods.setdefault(key, [0, 0])
        acc[0] += inflight
        acc[1] += d_nusd
        if d_tokens:
            b = (tenant_id, epoch_second(started_at))
            self.buckets[b] = self.buckets.get(b, 0) + d_tokens

    def write(self, db: Statements) -> None:
        db.write(_APPLY_SQL, [{"t": t, "day": db.time(day), "month": db.time(month),
                               "inflight": i, "d": d}
                              for (t, day, month), (i, d) in sorted(self.periods.items())])
        db.write(_BUCKET_CORRECT_SQL, [{"t": t, "s": s, "d": d}
                                       for (t, s), d in sorted(self.buckets.items())])


def release_lost(conn: Connection, tenant_id: int, rows: int) -> None:
    """``rows`` pending rows of the tenant were closed as lost: no longer in flight (their
    reservations stay charged)."""
    conn.execute(_APPLY, {"t": tenant_id, "inflight": -rows, "d": 0, "day": EPOCH,
                          "month": EPOCH})


def expire_buckets(conn: Connection, now: dt.datetime) -> int:
    """Drop buckets no window can reach any more (background)."""
    return conn.execute(_EXPIRE, {"before": epoch_second(now) - 2 * WINDOW_S}).rowcount
