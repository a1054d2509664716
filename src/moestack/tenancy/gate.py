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

import anyio
from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError

from moestack.api.generation import CLIENT_CLOSED, RequestRecord
from moestack.config.schema import MoestackConfig
from moestack.engine.protocol import GenerationRequest
from moestack.errors import AuthenticationError
from moestack.metering.cost import RequestCost
from moestack.tenancy import admission, ledger
from moestack.tenancy.admission import Principal, Reservation
from moestack.tenancy.fair import FairBoardLink, FairnessView, FairQueue, Slot
from moestack.tenancy.store import TenancyStore

log = logging.getLogger(__name__)

current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "moestack_principal", default=None)

TEMPLATE_TOKENS_PER_MESSAGE = 16
"""Allowance for chat-template tokens per message in the prompt-size upper bound."""


def prompt_tokens_upper_bound(request: GenerationRequest) -> int:
    """An upper bound of the prompt's tokens before tokenization: byte-level tokenizers never make
    more tokens than UTF-8 bytes; chat templates add a few tokens per message."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    if request.messages is not None:
        return sum(len(m.content.encode()) + TEMPLATE_TOKENS_PER_MESSAGE
                   for m in request.messages) + TEMPLATE_TOKENS_PER_MESSAGE
    return len((request.prompt or "").encode()) + 1


class Ticket:
    """An admitted request: its reservation, dispatch slot and engine request (with priority)."""

    def __init__(self, gate: TenancyGate, principal: Principal, reservation: Reservation,
                 request: GenerationRequest):
        self.gate, self.principal, self.reservation, self.request = (
            gate, principal, reservation, request)
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
        await self.gate.settle(record)
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
        self._fair_boards: dict[str, FairBoardLink] = {}
        self._fair_sync: asyncio.Task | None = None
        self.fair_shared: dict[str, bool] = {}
        """Per model: whether the last sync with the shared counters succeeded."""
        self._unsettled: list[RequestRecord] = []
        self.on_budget_remaining: Callable[[str, float], None] | None = None
        """Told (tenant, USD left net of running reservations) at each admission with a budget."""
        self.pricer: Callable[[RequestRecord], RequestCost] | None = None
        """Prices a finished request (self-hosted and baseline USD) for its ledger row."""

    @classmethod
    def from_config(cls, config: MoestackConfig) -> TenancyGate:
        return cls(config, TenancyStore.open(config.storage.url))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start renewing this gateway's leases and closing rows of dead gateways (idempotent)."""
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        if self._fair_boards and (self._fair_sync is None or self._fair_sync.done()):
            self._fair_sync = asyncio.get_running_loop().create_task(self._sync_fairness())

    async def stop(self) -> None:
        if self._fair_sync is not None:
            self._fair_sync.cancel()
            await asyncio.gather(self._fair_sync, return_exceptions=True)
            self._fair_sync = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except asyncio.CancelledError:
                pass
            self._heartbeat = None

    async def _beat(self) -> None:
        interval = self.settings.lease_s / 3
        while True:
            try:
                await self._retry_unsettled()
                await anyio.to_thread.run_sync(ledger.close_lost, self.store)
                await anyio.to_thread.run_sync(ledger.renew_leases, self.store, self.gateway_id,
                                               self.settings.lease_s)
            except SQLAlchemyError:
                # Fail open on purpose: a database blip must not stop future renewals; the
                # leases are long enough to ride it out, and admissions report their own errors.
                log.exception("tenancy heartbeat failed; retrying in %.0f s", interval)
            await asyncio.sleep(interval)

    async def settle(self, record: RequestRecord) -> None:
        """Settle a ledger row; if the database is unreachable, keep it and retry on the beat."""
        cost = self.pricer(record) if self.pricer is not None else None
        try:
            await anyio.to_thread.run_sync(
                ledger.settle, self.store, record, self.cost_usd(record),
                cost.self_hosted_usd if cost else None,
                dict(cost.baseline_usd) if cost else None)
        except SQLAlchemyError:
            # Fail open on purpose: the response is already produced; the row stays pending
            # (its reservation still counts against the limits) until a retry settles it.
            log.exception("could not settle %s; will retry", record.request_id)
            self._unsettled.append(record)

    async def _retry_unsettled(self) -> None:
        pending, self._unsettled = self._unsettled, []
        for record in pending:
            await self.settle(record)

    # -- the request path -----------------------------------------------------------------------

    async def authenticate(self, api_key: str | None) -> Principal:
        return await anyio.to_thread.run_sync(admission.authenticate, self.store, api_key)

    def queue(self, model: str) -> FairQueue:
        if model not in self._queues:
            self._queues[model] = FairQueue(self.dispatch_slots(model),
                                            self.settings.fair_queue.priority_step_tokens)
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
        m = self.config.model(model)
        replicas = max(1, m.initial_replicas if live_replicas is None else live_replicas)
        total = math.ceil(replicas * self.batch_slots(model) * (1 + fair.headroom_ratio))
        return max(1, -(-total // self.config.gateway.num_replicas))

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
        self.queue(model).set_capacity(self.dispatch_slots(model, live_replicas))

    def waiting(self) -> dict[str, int]:
        """Requests waiting in the fair queue, per model."""
        return {m.name: self.queue(m.name).waiting() for m in self.config.models}

    def reservation_for(self, model: str, request: GenerationRequest) -> Reservation:
        max_len = self.config.model(model).max_model_len
        prompt = min(prompt_tokens_upper_bound(request), max_len)
        completion = min(request.sampling.max_tokens or max_len, max_len)
        usd = self.settings.price(model).usd(prompt, completion)
        return Reservation(request.request_id, min(prompt + completion, max_len), usd)

    def cost_usd(self, record: RequestRecord) -> float:
        return self.settings.price(record.model).usd(record.prompt_tokens,
                                                      record.completion_tokens)

    async def admit(self, model: str, request: GenerationRequest, endpoint: str,
                    stream: bool) -> Ticket:
        """Check access and limits, write the ledger row ahead, wait for a fair dispatch slot."""
        principal = current_principal.get()
        if principal is None:
            raise AuthenticationError("Missing API key: send `Authorization: Bearer <key>`.")
        self.start()
        reservation = self.reservation_for(model, request)
        admission.check_model_access(principal, model)
        remaining = await anyio.to_thread.run_sync(lambda: admission.admit(
            self.store, principal, reservation=reservation, model=model, endpoint=endpoint,
            stream=stream, gateway_id=self.gateway_id, lease_s=self.settings.lease_s))
        if remaining is not None and self.on_budget_remaining is not None:
            self.on_budget_remaining(principal.tenant, remaining)
        ticket = Ticket(self, principal, reservation,
                        dataclasses.replace(request, priority=principal.priority,
                                            tenant=principal.tenant))
        try:
            ticket.slot = await self.queue(model).acquire(
                principal.tenant, principal.weight, principal.priority, reservation.tokens)
            ticket.priority = ticket.slot.priority
            ticket.request = dataclasses.replace(ticket.request, priority=ticket.priority)
        except BaseException:
            # Gone while queued: nothing ran; close the row so the reservation is released.
            with anyio.CancelScope(shield=True):
                await ticket.settle(RequestRecord(
                    request_id=request.request_id, model=model, endpoint=endpoint, stream=stream,
                    status_code=CLIENT_CLOSED, prompt_tokens=0, completion_tokens=0,
                    cached_prompt_tokens=0, ttft_s=None, e2e_s=0.0, error_code="client_closed"))
            raise
        return ticket


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def require_tenant(request: Request) -> Principal:
    """FastAPI dependency of the OpenAI routes: the bearer key's principal, or 401."""
    principal = await request.app.state.tenancy.authenticate(bearer_token(request))
    current_principal.set(principal)
    request.state.principal = principal
    return principal
