"""Tenancy at one gateway replica: its store, writer, key cache and lease beat.

:class:`Tenancy` is what the tenancy hooks (:mod:`moestack.tenancy.hooks`) work through:
authenticate a key (``auth``, an :class:`~moestack.tenancy.auth_cache.AuthCache`: at most
``tenancy.auth_cache_ttl_s`` stale, failures throttled per client address), reserve and admit a
request, writing its ledger row ahead (:meth:`Tenancy.reservation`, :meth:`Tenancy.admit`), and
settle the row when the request ends (:meth:`Tenancy.settle`). Its background work (the store
writer, the beat that renews this gateway's leases and closes the rows of dead ones, the key
cache's freshness check) runs from :meth:`Tenancy.start` to :meth:`Tenancy.stop`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

import anyio

from moestack.config.schema import MoestackConfig
from moestack.errors import StoreUnavailableError, StoreWriteError
from moestack.hooks import Principal, TokenBound
from moestack.tenancy import admission, counters, ledger, leases
from moestack.tenancy.admission import Reservation
from moestack.tenancy.auth_cache import AuthCache
from moestack.tenancy.keys import cache_salt, cache_salt_secret
from moestack.tenancy.ledger import Settlement
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.tables import utcnow
from moestack.tenancy.throttle import FailedAuthThrottle
from moestack.tenancy.writer import StoreWriter
from moestack.usage import CLIENT_CLOSED, RequestCost, RequestRecord

log = logging.getLogger(__name__)


class Tenancy:
    """Keys, limits, budgets and the ledger, for one gateway replica."""

    def __init__(self, config: MoestackConfig, store: TenancyStore):
        self.config = config
        self.settings = config.tenancy
        self.store = store
        self.gateway_id = f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._heartbeat: asyncio.Task | None = None
        self._row_lease_s = leases.row_lease_s(self.settings.lease_s)
        self._running: set[str] = set()
        """Request ids admitted here and not yet handed to settlement: the only rows whose
        lease the beat renews (a row whose settlement failed is left to expire as ``lost``)."""
        self.writer = StoreWriter(store, self.settings.settle_flush_interval_ms / 1000,
                                  self.settings.settle_batch_max_rows)
        self.auth = AuthCache(store, self.settings.auth_cache_ttl_s, throttle=FailedAuthThrottle(
            self.settings.auth_max_failures, self.settings.auth_window_s))
        self._salt_secret = cache_salt_secret(self.settings.admin_key_env)
        self._auth_refresh: asyncio.Task | None = None

    @classmethod
    def from_config(cls, config: MoestackConfig) -> Tenancy:
        return cls(config, TenancyStore.open(config.storage.url,
                                             busy_timeout_s=config.storage.busy_timeout_s))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the store writer, the beat (renew this gateway's leases, close rows of dead
        gateways, drop expired rate buckets and raw rows past retention) and the auth cache's
        freshness check (idempotent)."""
        self.writer.start()
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        if self.auth.ttl_s > 0 and (self._auth_refresh is None or self._auth_refresh.done()):
            self._auth_refresh = asyncio.get_running_loop().create_task(self.auth.keep_fresh())

    async def stop(self) -> None:
        """Stop the beat and the auth check, and flush queued settlements (those the store
        cannot take now stay pending in the ledger and are closed as lost, keeping their
        reservation)."""
        for task in (self._auth_refresh, self._heartbeat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._auth_refresh = self._heartbeat = None
        left = await anyio.to_thread.run_sync(self.writer.stop)
        if left:
            log.warning("%d settlements could not be written before stop", left)

    async def _beat(self) -> None:
        interval = leases.beat_interval_s(self.settings.lease_s)  # see moestack.tenancy.leases
        while True:
            try:
                await self._write(ledger.renew_leases, self.gateway_id, self._row_lease_s,
                                  list(self._running))
                while await self._write(ledger.close_lost) == ledger.CLOSE_BATCH_ROWS:
                    pass
                await self._write(counters.expire_buckets, utcnow())
                if (days := self.settings.raw_usage_retention_days) is not None:
                    await self._write(ledger.purge_raw, days)
            except (StoreUnavailableError, StoreWriteError) as exc:
                # Fail open on purpose: a database blip must not stop future renewals; the
                # leases are long enough to ride it out, and admissions report their own errors.
                log.warning("tenancy heartbeat: %s; retrying in %.0f s", exc.code, interval)
            await asyncio.sleep(interval)

    async def _write(self, fn, *args):
        return await asyncio.wrap_future(self.writer.submit(lambda conn: fn(conn, *args)))

    # -- the request path -----------------------------------------------------------------------

    def cache_salt(self, tenant_id: int) -> str:
        """The tenant's prefix-cache salt (see :func:`moestack.tenancy.keys.cache_salt`)."""
        return cache_salt(self._salt_secret, tenant_id)

    def reservation(self, model: str, tokens: TokenBound, request_id: str,
                    budget_field: str | None = None,
                    usd_per_1m_tokens: float | None = None) -> Reservation:
        """What admission holds for a request: its token bound, priced at the tenant prices
        (at ``usd_per_1m_tokens``, a LoRA adapter's own price, when given); 400 naming
        ``budget_field`` if one request may not hold that much."""
        usd = (self.settings.price(model).usd(tokens.prompt_tokens, tokens.completion_tokens)
               if usd_per_1m_tokens is None else tokens.total * usd_per_1m_tokens / 1e6)
        reservation = Reservation(request_id, tokens.total, usd)
        reservation.check_size(budget_field)
        return reservation

    async def admit(self, principal: Principal, reservation: Reservation, model: str,
                    endpoint: str, stream: bool) -> float | None:
        """Check the tenant's limits and write the ledger row ahead (committed before this
        returns), or raise 429/503. Returns the USD left in the tenant's budget net of every
        running reservation (None: no budget)."""
        self.start()
        future = self.writer.submit_batched(admission.admit_many, admission.Admission(
            principal, reservation, model, endpoint, stream, self.gateway_id,
            self._row_lease_s), principal.tenant_id, deferred=False,
            loop=asyncio.get_running_loop())
        try:
            remaining = await asyncio.shield(future)
        except StoreUnavailableError:
            # The commit may have happened before the store failed: release the row (if any)
            # once the store is back. Settling a row that does not exist changes nothing.
            self._release(principal, reservation, model, endpoint, stream, "store_unavailable")
            raise
        except asyncio.CancelledError:
            # The client left while the row was being written: release it if it was.
            future.add_done_callback(lambda f: f.exception() is None and self._release(
                principal, reservation, model, endpoint, stream, "client_closed"))
            raise
        self._running.add(reservation.request_id)
        return remaining

    def settle(self, record: RequestRecord, cost: RequestCost | None, tenant_id: int) -> None:
        """Queue the settlement of a ledger row at ``cost`` (written in the next batch, within
        ``settle_flush_interval_ms``; kept and retried while the store is unavailable). Without
        a price, a request that used nothing is charged nothing; one that used tokens keeps
        its reservation (the row is closed as ``lost``, an upper bound). Safe from any thread
        (the writer's too)."""
        self._running.discard(record.request_id)
        if cost is None and (record.prompt_tokens or record.completion_tokens):
            log.error("request %s ended unpriced: its ledger row keeps its reservation",
                      record.request_id)
            self.writer.submit(_close_unsettled(record.request_id), tenant_id)
            return
        s = (Settlement(record, 0.0) if cost is None else
             Settlement(record, cost.charged_usd, cost.cost_usd, dict(cost.baseline_usd)))
        self.writer.submit_batched(ledger.settle_many, s, tenant_id,
                                   fallback=_close_unsettled(record.request_id))

    def _release(self, principal: Principal, reservation: Reservation, model: str,
                 endpoint: str, stream: bool, why: str) -> None:
        record = RequestRecord(request_id=reservation.request_id, model=model,
                               endpoint=endpoint, stream=stream, status_code=CLIENT_CLOSED
                               if why == "client_closed" else 503, prompt_tokens=0,
                               completion_tokens=0, cached_prompt_tokens=0, ttft_s=None,
                               e2e_s=0.0, error_code=why)
        self.settle(record, None, principal.tenant_id)


def _close_unsettled(request_id: str):
    """What the writer runs if a settlement fails on its own (not a store outage): close the
    row as ``lost``, keeping its reservation, so it leaves the tenant's in-flight count."""
    return lambda conn: ledger.close_unsettled(conn, [request_id])
