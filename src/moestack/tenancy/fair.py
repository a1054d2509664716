"""Weighted, token-based, work-conserving fair queue: Virtual Token Counter (VTC).

After Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024.

Each model has ``max_inflight`` dispatch slots per gateway replica: what the model's replicas
run in one batch (vLLM's ``max_num_seqs``), plus a little headroom, shared by the gateway
replicas (see ``TenancyGate.dispatch_slots``). A request takes a slot at once if one is free and
nobody waits (work conserving). Otherwise it waits here; when a slot frees, the waiting request
that goes next is the first one of the tenant in the best priority tier (lowest number, as in
vLLM) with the smallest virtual token counter. So the gateway holds only what the replicas cannot
take; the replicas' batches stay full.

Counters. A tenant's counter grows by ``tokens / weight`` for the work it is given: prompt plus
completion tokens (prefill is work). At dispatch it is charged an estimate: its moving average of
real tokens per request (all tenants' for a newcomer), at most the request's reservation; at
release the estimate is corrected to the real count. (Charging the reservation itself, an upper
bound often several times the real size, would inflate the counters of tenants with many
requests running, and a tenant lifted to such a counter would fall behind when it deflates.)
Backlogged tenants therefore receive tokens in proportion to their weights. A tenant
that was idle (nothing waiting or running) is lifted, when it comes back, to the smallest counter
among the backlogged tenants (or the counter of the last dispatched one): idleness is not banked
as credit. A tenant with requests running is active and keeps its counter.

Dynamic engine priority. Each dispatched request carries an engine priority for vLLM's
``scheduling_policy: priority`` (lower runs first): ``tier * TIER_SPAN + rank``, where ``rank``
is how far the tenant's counter is ahead of the smallest counter of the active tenants of its
tier, in steps of ``priority_step_tokens`` (capped at ``TIER_SPAN - 1``). Tiers dominate; within
a tier the tenant furthest below its share runs first among the requests waiting inside vLLM, and
can preempt where vLLM preempts. ``priority_step_tokens=None`` sends the tier alone (static).

Shared counters. With several gateway replicas the counters are merged through a shared board
(``moestack.serve.fair_board``): :meth:`FairQueue.sync_out` hands over what changed since the
last sync (charges and lifts), :meth:`FairQueue.sync_in` takes back the merged counters and
which tenants are active or backlogged at the other gateways. Between syncs a gateway runs on
its own view; without a board (or while it is lost) it runs on local counters alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

TIER_SPAN = 1000
"""Engine priorities of one tier: ``tier * TIER_SPAN`` up to ``tier * TIER_SPAN + 999``."""

SHARE_WINDOW_S = 60.0
"""Tokens served over this window give each tenant's share."""

MEAN_ALPHA = 0.2
"""Weight of the newest request in a tenant's moving average of real tokens per request."""


@dataclass
class _Waiter:
    tenant: str
    cost_tokens: int
    future: asyncio.Future


@dataclass
class _TenantState:
    weight: float = 1.0
    priority: int = 0
    counter: float = 0.0
    inflight: int = 0
    queue: deque[_Waiter] = field(default_factory=deque)
    pending: float = 0.0
    """Weighted tokens charged here since the last sync."""
    lift: float | None = None
    """Counter this tenant was lifted to since the last sync."""
    mean_tokens: float | None = None
    """Moving average of the real tokens of this tenant's released requests."""
    inflight_charge: float = 0.0
    """Weighted tokens charged ahead for the requests still running."""

    @property
    def active(self) -> bool:
        return bool(self.queue) or self.inflight > 0


@dataclass(frozen=True)
class SyncOut:
    """What one gateway tells the board about one model."""

    deltas: dict[str, float]
    lifts: dict[str, float]
    counters: dict[str, float]
    """This gateway's full view, to re-seed a board that lost its state."""
    active: dict[str, bool]
    """Tenant -> backlogged here (True) or only running here (False); idle tenants absent."""
    served_tokens: dict[str, int]
    weights: dict[str, float]


@dataclass(frozen=True)
class SyncIn:
    """What the board answers: merged counters, activity elsewhere, shares of served tokens."""

    counters: dict[str, float]
    active_elsewhere: dict[str, bool]
    shares: dict[str, float]
    weight_shares: dict[str, float]


class FairBoardLink(Protocol):
    """Where a gateway merges one model's counters with the others' (``moestack.serve.fair_board``)."""

    async def sync(self, gateway_id: str, out: SyncOut) -> SyncIn | None: ...


@dataclass(frozen=True)
class FairnessView:
    """One model's fairness state as this gateway sees it."""

    counters: dict[str, float]
    """Virtual token counter per tenant (weighted tokens)."""
    token_shares: dict[str, float]
    """Share of the tokens served over the last minute per tenant."""
    weight_shares: dict[str, float]
    """Share of the weight among the active tenants: what ``token_shares`` should be."""
    shared: bool | None
    """Counters merged with the other gateways at the last sync; None: not shared."""


class Slot:
    """A dispatch slot held by one request; release it exactly once with the real token count."""

    def __init__(self, owner: FairQueue, tenant: str, charged_tokens: float, priority: int):
        self._owner, self.tenant, self.charged_tokens = owner, tenant, charged_tokens
        self.priority = priority
        """Engine priority of this request (vLLM: lower runs first)."""
        self._released = False

    def release(self, actual_tokens: int) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self, actual_tokens)


class FairQueue:
    """VTC over one model's dispatch slots; single event loop, no locks needed."""

    def __init__(self, max_inflight: int, priority_step_tokens: float | None = None):
        self.max_inflight = max_inflight
        self.priority_step_tokens = priority_step_tokens
        self.inflight = 0
        self._tenants: dict[str, _TenantState] = {}
        self._last_counter = 0.0
        self._mean_tokens: float | None = None  # all tenants': the estimate for newcomers
        self._elsewhere: dict[str, bool] = {}
        self._served: deque[tuple[float, str, int]] = deque()
        self._unsynced_served: dict[str, int] = {}
        self.shared_shares: tuple[dict[str, float], dict[str, float]] | None = None
        """Shares from the board's last answer; None while running on local state."""

    # -- views --------------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        return {t: s.counter for t, s in self._tenants.items()}

    def waiting(self) -> int:
        return sum(len(s.queue) for s in self._tenants.values())

    def shares(self, now_s: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """(share of served tokens, share of weight among active tenants) per tenant: the
        board's when shared, else this gateway's own over ``SHARE_WINDOW_S``."""
        if self.shared_shares is not None:
            return self.shared_shares
        now_s = time.monotonic() if now_s is None else now_s
        while self._served and now_s - self._served[0][0] > SHARE_WINDOW_S:
            self._served.popleft()
        tokens: dict[str, int] = {}
        for _, tenant, n in self._served:
            tokens[tenant] = tokens.get(tenant, 0) + n
        active = {t: s.weight for t, s in self._tenants.items() if s.active}
        return share_of(tokens), share_of(active)

    def set_capacity(self, max_inflight: int) -> None:
        """Change the slot count (the model's replicas changed); more slots dispatch waiters."""
        self.max_inflight = max(1, max_inflight)
        self._fill()

    # -- the request path -----------------------------------------------------------------------

    async def acquire(self, tenant: str, weight: float, priority: int, cost_tokens: int) -> Slot:
        state = self._tenants.setdefault(tenant, _TenantState())
        state.weight, state.priority = weight, priority
        if not state.active and tenant not in self._elsewhere:
            self._lift(state)
        if self.inflight < self.max_inflight and not self.waiting():
            return self._dispatch(state, tenant, cost_tokens)
        waiter = _Waiter(tenant, cost_tokens, asyncio.get_running_loop().create_future())
        state.queue.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release(0)  # got a slot just as the caller went away
            elif waiter in state.queue:
                state.queue.remove(waiter)
            raise

    def _lift(self, state: _TenantState) -> None:
        """Idle until now (here and at the other gateways): no banked credit."""
        backlogged = [self._served_so_far(s) for t, s in self._tenants.items()
                      if s.queue or self._elsewhere.get(t)]
        floor = min(backlogged) if backlogged else self._last_counter
        if floor > state.counter:
            state.counter, state.pending, state.lift = floor, 0.0, floor

    def _served_so_far(self, state: _TenantState) -> float:
        """The counter with running requests counted at the best estimate of their size (the
        moving average), or not at all before any request was released: a reservation charged
        ahead at a cold start is an upper bound that deflates at release, and lifting a newcomer
        to it would put it behind work that never existed."""
        mean = state.mean_tokens if state.mean_tokens is not None else self._mean_tokens
        running = state.inflight * (mean or 0.0) / state.weight
        return state.counter - state.inflight_charge + running

    def engine_priority(self, state: _TenantState) -> int:
        """``tier * TIER_SPAN + rank`` (see the module docstring); the tier alone if static."""
        if self.priority_step_tokens is None:
            return state.priority
        floor = min((s.counter for t, s in self._tenants.items()
                     if s.priority == state.priority and (s.active or t in self._elsewhere)),
                    default=state.counter)
        rank = int(max(0.0, state.counter - floor) / self.priority_step_tokens)
        return state.priority * TIER_SPAN + min(TIER_SPAN - 1, rank)

    def _dispatch(self, state: _TenantState, tenant: str, cost_tokens: int) -> Slot:
        self._last_counter = state.counter  # where the newest work started
        priority = self.engine_priority(state)
        self.inflight += 1
        state.inflight += 1
        # Charged ahead: the reservation (an upper bound), or less once the tenant's requests
        # are known to be smaller; corrected to the real count at release.
        mean = state.mean_tokens if state.mean_tokens is not None else self._mean_tokens
        charge = cost_tokens if mean is None else min(cost_tokens, mean)
        state.inflight_charge += charge / state.weight
        self._charge(state, charge / state.weight)
        return Slot(self, tenant, charge, priority)

    def _charge(self, state: _TenantState, weighted_tokens: float) -> None:
        state.counter += weighted_tokens
        state.pending += weighted_tokens

    def _release(self, slot: Slot, actual_tokens: int) -> None:
        self.inflight -= 1
        state = self._tenants[slot.tenant]
        state.inflight -= 1
        state.inflight_charge = max(0.0, state.inflight_charge - slot.charged_tokens / state.weight)
        self._charge(state, (actual_tokens - slot.charged_tokens) / state.weight)
        if actual_tokens:
            state.mean_tokens = moving_mean(state.mean_tokens, actual_tokens)
            self._mean_tokens = moving_mean(self._mean_tokens, actual_tokens)
            self._served.append((time.monotonic(), slot.tenant, actual_tokens))
            self._unsynced_served[slot.tenant] = (self._unsynced_served.get(slot.tenant, 0)
                                                  + actual_tokens)
        self._fill()

    def _fill(self) -> None:
        while self.inflight < self.max_inflight:
            best = min((s for s in self._tenants.values() if s.queue),
                       key=lambda s: (s.priority, s.counter), default=None)
            if best is None:
                return
            waiter = best.queue.popleft()
            if waiter.future.done():  # cancelled while waiting
                continue
            waiter.future.set_result(self._dispatch(best, waiter.tenant, waiter.cost_tokens))

    # -- shared counters ----------------------------------------------------------------------

    def sync_out(self) -> SyncOut:
        """What changed since the last sync (then forgotten here: the board holds it)."""
        out = SyncOut(
            deltas={t: s.pending for t, s in self._tenants.items() if s.pending},
            lifts={t: s.lift for t, s in self._tenants.items() if s.lift is not None},
            counters=self.counters(),
            active={t: bool(s.queue) for t, s in self._tenants.items() if s.active},
            served_tokens=self._unsynced_served,
            weights={t: s.weight for t, s in self._tenants.items()})
        for s in self._tenants.values():
            s.pending, s.lift = 0.0, None
        self._unsynced_served = {}
        return out

    def sync_in(self, merged: SyncIn | None) -> None:
        """Take the board's merged counters (plus what was charged here since ``sync_out``);
        None (board lost): carry on with the local counters, forget other gateways."""
        if merged is None:
            self._elsewhere, self.shared_shares = {}, None
            return
        for tenant, counter in merged.counters.items():
            state = self._tenants.setdefault(tenant, _TenantState())
            base = counter if state.lift is None else max(counter, state.lift)
            state.counter = base + state.pending
        self._elsewhere = dict(merged.active_elsewhere)
        self.shared_shares = (dict(merged.shares), dict(merged.weight_shares))
        self._fill()


def moving_mean(mean: float | None, value: float) -> float:
    return value if mean is None else MEAN_ALPHA * value + (1 - MEAN_ALPHA) * mean


def share_of(amounts: dict[str, float]) -> dict[str, float]:
    total = sum(amounts.values())
    return {k: v / total for k, v in amounts.items()} if total else {}
