"""The tenancy layer in the serving path: authenticate, admit, queue fairly, settle.

:class:`TenancyGate` is the ``admission`` hook of the generation service (``GenerationService``):
``admit`` runs before the backend is called and returns a :class:`Ticket` that the service settles
in the same shielded ``finally`` that emits the request's usage record. The principal comes from
:func:`require_tenant`, the FastAPI dependency on the OpenAI routes, through a context variable
(the route and the service run in the same task).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from fastapi import Request

from moestack.config.schema import MoestackConfig
from moestack.errors import AuthenticationError, StoreUnavailableError
from moestack.metering.cost import RequestCost
from moestack.tenancy import admission, counters, ledger
from moestack.tenancy.admission import Principal, Reservation
from moestack.tenancy.auth_cache import AuthCache
from moestack.tenancy.fair import FairBoardLink, FairnessView, FairQueue, Slot
from moestack.tenancy.ledger import Settlement
from moestack.tenancy.models import utcnow
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.writer import StoreWriter
from moestack.usage import CLIENT_CLOSED, RequestRecord

if TYPE_CHECKING:
    from moestack.api.endpoints import RequestFacts

log = logging.getLogger(__name__)

current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "moestack_principal", default=None)

class Ticket:
    """An admitted request: its reservation, dispatch slot and engine priority."""

    def __init__(self, gate: TenancyGate, principal: Principal, reservation: Reservation):
        self.gate, self.principal, self.reservation = gate, principal, reservation
        self.slot: Slot | None = None
        self.priority: int = principal.priority
        """Engine priority to send (vLLM's request ``priority``, lower runs first): the dynamic
        one of the dispatch slot, from the tenant's tier and virtual token counter."""
        self._settled = False

    async def settle(self, record: RequestRecord) -> RequestRecord:
        """Settle the ledger row with the real usage (once); returns the record with the tenant."""
        record = dataclasses.replace(record, tenant=self.principal.tenant,
                                     key_id=self.principal.key_id)
        if self._settled:
            return record
        self._settled = True
        if self.slot is not None:
            self.slot.release(record.prompt_tokens + record.completion_tokens)
        await self.gate.settle(record, self.principal.tenant_id)
        return record


class TenancyGate:
    """Authentication, admission, fair queueing and ledger settlement for one gateway replica."""

    def __init__(self, config: MoestackConfig, store: TenancyStore):
        self.config = config
        self.settings = config.tenancy
        self.store = store
        self.gateway_id = f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._queues: dict[str, FairQueue] = {}
        self._heartbeat: asyncio.Task | None = None
        self.writer = StoreWriter(store, self.settings.settle_flush_interval_ms / 1000,
                                  self.settings.settle_batch_max_rows)
        self.auth = AuthCache(store, self.settings.auth_cache_ttl_s)
        self._fair_boards: dict[str, FairBoardLink] = {}
        self._fair_sync: asyncio.Task | None = None
        self._auth_refresh: asyncio.Task | None = None
        self.fair_shared: dict[str, bool] = {}
        """Per model: whether the last sync with the shared counters succeeded."""
        self.on_budget_remaining: Callable[[str, float], None] | None = None
        """Told (tenant, USD left net of running reservations) at each admission with a budget."""
        self.pricer: Callable[[RequestRecord], RequestCost] | None = None
        """Prices a finished request (self-hosted and baseline USD) for its ledger row."""

    @classmethod
    def from_config(cls, config: MoestackConfig) -> TenancyGate:
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
        if self._fair_boards and (self._fair_sync is None or self._fair_sync.done()):
            self._fair_sync = asyncio.get_running_loop().create_task(self._sync_fairness())
        if self.auth.ttl_s > 0 and (self._auth_refresh is None or self._auth_refresh.done()):
            self._auth_refresh = asyncio.get_running_loop().create_task(self.auth.keep_fresh())

    async def stop(self) -> None:
        """Stop the beat, the fairness sync and the auth check, and flush queued settlements
        (those the store cannot take now stay pending in the ledger and are closed as lost,
        keeping their reservation)."""
        for task in (self._fair_sync, self._auth_refresh):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fair_sync = self._auth_refresh = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except asyncio.CancelledError:
                pass
            self._heartbeat = None
        left = await anyio.to_thread.run_sync(self.writer.stop)
        if left:
            log.warning("%d settlements could not be written before stop", left)

    async def _beat(self) -> None:
        interval = self.settings.lease_s / 3
        while True:
            try:
                await self._write(ledger.renew_leases, self.gateway_id, self.settings.lease_s)
                while await self._write(ledger.close_lost) == ledger.CLOSE_BATCH_ROWS:
                    pass
                await self._write(counters.expire_buckets, utcnow())
                if (days := self.settings.raw_usage_retention_days) is not None:
                    await self._write(ledger.purge_raw, days)
            except StoreUnavailableError:
                # Fail open on purpose: a database blip must not stop future renewals; the
                # leases are long enough to ride it out, and admissions report their own errors.
                log.warning("tenancy heartbeat: store unavailable; retrying in %.0f s", interval)
            await asyncio.sleep(interval)

    async def _write(self, fn, *args):
        return await asyncio.wrap_future(self.writer.submit(lambda conn: fn(conn, *args)))

    async def settle(self, record: RequestRecord, tenant_id: int = 0) -> None:
        """Queue the settlement of a ledger row: written in the next batch, within
        ``settle_flush_interval_ms``; kept and retried while the store is unavailable."""
        cost = self.pricer(record) if self.pricer is not None else None
        s = Settlement(record, self.cost_usd(record), cost.self_hosted_usd if cost else None,
                       dict(cost.baseline_usd) if cost else None)
        self.start()
        self.writer.submit_batched(ledger.settle_many, s, tenant_id)

    # -- the request path -----------------------------------------------------------------------

    async def authenticate(self, api_key: str | None) -> Principal:
        """The key's principal from the auth cache (at most ``auth_cache_ttl_s`` stale)."""
        return await self.auth.principal(api_key)

    def queue(self, model: str) -> FairQueue:
        if model not in self._queues:
            self._queues[model] = FairQueue(self.dispatch_slots(model),
                                            self.settings.fair_queue.priority_step_tokens,
                                            *self.reserve(model))
        return self._queues[model]

    def batch_slots(self, model: str) -> int:
        """Requests one replica of ``model`` runs in one batch (see ``FairQueueConfig``)."""
        m = self.config.model(model)
        return (self.settings.fair_queue.batch_slots_per_replica
                or m.engine_args.get("max_num_seqs") or m.fake.max_num_seqs
                or m.max_ongoing_requests)

    def dispatch_slots(self, model: str, live_replicas: int | None = None) -> int:
        """This gateway replica's fair-queue slots for ``model``: the configured number, else
        what the model's replicas (live, or the initial ones) run in one batch plus the
        headroom, shared by the gateway replicas. A model scaled to zero gets one replica's
        worth, so the first requests reach Ray Serve and start it."""
        fair = self.settings.fair_queue
        if fair.max_inflight_requests_per_model is not None:
            return fair.max_inflight_requests_per_model
        replicas = self._replicas(model, live_replicas)
        total = math.ceil(replicas * self.batch_slots(model) * (1 + fair.headroom_ratio))
        return max(1, -(-total // self.config.gateway.num_replicas))

    def _replicas(self, model: str, live_replicas: int | None) -> int:
        """The model's live replicas, or its initial ones; at least one (scaled to zero, the
        first requests must reach Ray Serve to start one)."""
        return max(1, self.config.model(model).initial_replicas if live_replicas is None
                   else live_replicas)

    def reserve(self, model: str, live_replicas: int | None = None) -> tuple[int, int]:
        """(batch slots, reserved batch slots) of this gateway replica for ``model``: the
        replicas' batch and ``reserve_batch_slots_per_replica`` of each, shared by the gateway
        replicas (rounded up: each gateway keeps at least one when there is a reserve). With a
        fixed ``max_inflight_requests_per_model`` the batch is that number."""
        fair = self.settings.fair_queue
        replicas = self._replicas(model, live_replicas)
        gateways = self.config.gateway.num_replicas
        if fair.max_inflight_requests_per_model is not None:
            batch = fair.max_inflight_requests_per_model
        else:
            batch = max(1, -(-replicas * self.batch_slots(model) // gateways))
        reserve = -(-replicas * fair.reserve_batch_slots_per_replica // gateways)
        return batch, min(reserve, batch - 1)

    def share_fairness(self, boards: dict[str, FairBoardLink]) -> None:
        """Merge each model's virtual token counters with the other gateway replicas through
        ``boards[model]`` every ``sync_interval_s`` (from :meth:`start`)."""
        if self.settings.fair_queue.shared_counters:
            self._fair_boards = dict(boards)

    async def _sync_fairness(self) -> None:
        interval = self.settings.fair_queue.sync_interval_s
        while True:
            for model, board in self._fair_boards.items():
                queue = self.queue(model)
                merged = await board.sync(self.gateway_id, queue.sync_out())
                queue.sync_in(merged)  # None: board lost, run on local counters until back
                self.fair_shared[model] = merged is not None
            await asyncio.sleep(interval)

    def fairness(self, model: str) -> FairnessView:
        """Counters and shares of ``model``'s tenants, for the metrics."""
        queue = self.queue(model)
        shares, weight_shares = queue.shares()
        return FairnessView(queue.counters(), shares, weight_shares,
                            self.fair_shared.get(model))

    def follow_replicas(self, model: str, live_replicas: int) -> None:
        """The model now has ``live_replicas``: resize its fair queue's slots to match."""
        self.queue(model).set_capacity(self.dispatch_slots(model, live_replicas),
                                       *self.reserve(model, live_replicas))

    def waiting(self) -> dict[str, int]:
        """Requests waiting in the fair queue, per model."""
        return {m.name: self.queue(m.name).waiting() for m in self.config.models}

    def reservation_for(self, model: str, facts: RequestFacts, request_id: str,
                        generates: bool = True) -> Reservation:
        """An upper bound of what the request can use: every prompt at its byte bound (capped
        at the context), every choice of every prompt at its full completion budget."""
        max_len = self.config.model(model).max_model_len
        prompt = min(facts.prompt_tokens_bound, max_len * facts.prompts)
        per_choice = min(facts.max_tokens or max_len, max_len) if generates else 0
        completion = per_choice * facts.choices * facts.prompts
        usd = self.settings.price(model).usd(prompt, completion)
        return Reservation(request_id, prompt + completion, usd)

    def cost_usd(self, record: RequestRecord) -> float:
        return self.settings.price(record.model).usd(record.prompt_tokens,
                                                      record.completion_tokens)

    async def admit(self, model: str, facts: RequestFacts, request_id: str,
                    endpoint: str, generates: bool = True) -> Ticket:
        """Check access and limits, write the ledger row ahead, wait for a fair dispatch slot."""
        principal = current_principal.get()
        if principal is None:
            raise AuthenticationError("Missing API key: send `Authorization: Bearer <key>`.")
        self.start()
        reservation = self.reservation_for(model, facts, request_id, generates)
        stream = facts.stream
        admission.check_model_access(principal, model)
        remaining = await self._admit(principal, reservation, model, endpoint, stream)
        if remaining is not None and self.on_budget_remaining is not None:
            self.on_budget_remaining(principal.tenant, remaining)
        ticket = Ticket(self, principal, reservation)
        try:
            ticket.slot = await self.queue(model).acquire(
                principal.tenant, principal.weight, principal.priority, reservation.tokens)
            ticket.priority = ticket.slot.priority
        except BaseException:
            # Gone while queued: nothing ran; close the row so the reservation is released.
            with anyio.CancelScope(shield=True):
                await ticket.settle(RequestRecord(
                    request_id=request_id, model=model, endpoint=endpoint, stream=stream,
                    status_code=CLIENT_CLOSED, prompt_tokens=0, completion_tokens=0,
                    cached_prompt_tokens=0, ttft_s=None, e2e_s=0.0, error_code="client_closed"))
            raise
        return ticket

    async def _admit(self, principal: Principal, reservation: Reservation, model: str,
                     endpoint: str, stream: bool) -> float | None:
        """Write the ledger row ahead (committed before this returns), or raise 429/503."""
        future = self.writer.submit(lambda conn: admission.admit_in(
            conn, principal, reservation=reservation, model=model, endpoint=endpoint,
            stream=stream, gateway_id=self.gateway_id, lease_s=self.settings.lease_s),
            principal.tenant_id)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
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

    def _release(self, principal: Principal, reservation: Reservation, model: str,
                 endpoint: str, stream: bool, why: str) -> None:
        record = RequestRecord(request_id=reservation.request_id, model=model,
                               endpoint=endpoint, stream=stream, status_code=CLIENT_CLOSED
                               if why == "client_closed" else 503, prompt_tokens=0,
                               completion_tokens=0, cached_prompt_tokens=0, ttft_s=None,
                               e2e_s=0.0, error_code=why)
        s = Settlement(record, 0.0)
        self.writer.submit_batched(ledger.settle_many, s, principal.tenant_id)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else of an ``x-api-key``
    header (what the Anthropic SDK sends), else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return request.headers.get("x-api-key")


async def require_tenant(request: Request) -> Principal:
    """FastAPI dependency of the OpenAI routes: the bearer key's principal, or 401."""
    principal = await request.app.state.tenancy.authenticate(bearer_token(request))
    current_principal.set(principal)
    request.state.principal = principal
    return principal
