"""The monthly overflow budget of a tenant: reserved before a request goes to a provider, settled
with the provider's own figures, exactly like the tenant's USD budget (:mod:`.admission`).

Reservation (:func:`reserve_in`, one transaction under the tenant's lock, the lock every writer of
the tenant takes first): roll the tenant's ``overflow_counters`` row to the current UTC month,
refuse if what the month's overflowed requests cost or hold plus this request's upper bound
(its token bound at the provider's prices) is over ``overflow_budget_usd``, else add the bound
and mark the request's ledger row with its backend (``provider:<name>``). Settlement
(:func:`settle_in`) replaces the bound by what the provider reported, in the month the
reservation went to. A refused reservation writes nothing: the request waits for a replica
(today's behaviour), it never overflows. If the settlement cannot be written the reservation
stays: an upper bound, so a tenant cannot overspend.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from moestack.hooks import Principal
from moestack.tenancy import counters
from moestack.tenancy.store import period_start, sql
from moestack.tenancy.tables import utcnow
from moestack.tenancy.writer import StoreWriter
from moestack.usage import NUSD_PER_USD, to_nusd

_READ = sql("SELECT month_start, month_nusd FROM overflow_counters WHERE tenant_id = :t",
            columns=("month_start", "month_nusd"), time_columns=("month_start",))
_INSERT = sql("INSERT INTO overflow_counters (tenant_id, month_start, month_nusd) VALUES "
              "(:t, :month, :nusd)", times=("month",))
_WRITE = sql("UPDATE overflow_counters SET month_start = :month, month_nusd = :nusd WHERE "
             "tenant_id = :t", times=("month",))
_CORRECT = sql("UPDATE overflow_counters SET month_nusd = month_nusd + :d WHERE tenant_id = :t "
               "AND month_start = :month", times=("month",))
_MARK = sql("UPDATE usage_ledger SET backend = :backend WHERE request_id = :id AND "
            "state = 'pending'")


@dataclass(frozen=True)
class OverflowHold:
    """An overflow reservation, until it is settled."""

    tenant_id: int
    month_start: dt.datetime
    nusd: int


def spent_nusd(conn: Connection, tenant_id: int, now: dt.datetime) -> int:
    """What the tenant's overflowed requests cost or hold this UTC month."""
    row = conn.execute(_READ, {"t": tenant_id}).first()
    if row is None or row[0] < period_start("month", now):
        return 0
    return int(row[1])


def reserve_in(conn: Connection, tenant_id: int, request_id: str, backend: str, nusd: int,
               budget_usd: float | None, now: dt.datetime | None = None) -> OverflowHold | None:
    """Hold ``nusd`` of the tenant's overflow budget for ``request_id`` and mark its ledger row
    with ``backend``; None (writing nothing) if the budget cannot take it."""
    now = now or utcnow()
    if counters.lock(conn, tenant_id) is None:  # the tenant's lock, taken first as always
        return None
    month = period_start("month", now)
    row = conn.execute(_READ, {"t": tenant_id}).first()
    spent = 0 if row is None or row[0] < month else int(row[1])
    if budget_usd is not None and spent + nusd > to_nusd(budget_usd):
        return None
    if row is None:
        conn.execute(_INSERT, {"t": tenant_id, "month": month, "nusd": nusd})
    else:
        conn.execute(_WRITE, {"t": tenant_id, "month": max(month, row[0]),
                              "nusd": spent + nusd})
    conn.execute(_MARK, {"backend": backend, "id": request_id})
    return OverflowHold(tenant_id, month, nusd)


def settle_in(conn: Connection, hold: OverflowHold, actual_nusd: int) -> None:
    """Replace the hold by what the provider billed (in the month the hold went to)."""
    if actual_nusd != hold.nusd:
        conn.execute(_CORRECT, {"t": hold.tenant_id, "month": hold.month_start,
                                "d": actual_nusd - hold.nusd})


def upper_nusd(usd: float) -> int:
    """A reservation in nano-USD, rounded up (it must stay an upper bound)."""
    return math.ceil(usd * NUSD_PER_USD - 1e-6)


class OverflowBudget:
    """Overflow reservations and settlements through a gateway's store writer."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer

    async def reserve(self, principal: Principal, request_id: str, backend: str,
                      usd: float) -> OverflowHold | None:
        """Hold ``usd`` (an upper bound) of the principal's overflow budget; None if refused."""
        nusd = upper_nusd(usd)
        future = self.writer.submit(lambda conn: reserve_in(
            conn, principal.tenant_id, request_id, backend, nusd,
            principal.overflow_budget_usd), principal.tenant_id)
        return await asyncio.shield(asyncio.wrap_future(future))

    def settle(self, hold: OverflowHold, usd: float) -> None:
        """Queue the settlement of ``hold`` at ``usd`` (what the provider reported)."""
        self.writer.submit(lambda conn: settle_in(conn, hold, to_nusd(usd)), hold.tenant_id,
                           deferred=True)
