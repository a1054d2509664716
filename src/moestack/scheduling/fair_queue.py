"""Weighted, token-based, work-conserving fair queue: Virtual Token Counter (VTC).

After Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024.

Each model has ``max_inflight`` dispatch slots per gateway replica: what the model's replicas
run in one batch (vLLM's ``max_num_seqs``), plus a little headroom, shared by the gateway
replicas (see :func:`moestack.scheduling.capacity.dispatch_slots`). A request takes a slot at
once if one is free and nobody waits (work conserving). Otherwise it waits here; when a slot frees, the waiting request
that goes next is the first one of the tenant in the best priority tier (lowest number, as in
vLLM) with the smallest virtual token counter. So the gateway holds only what the replicas cannot
take; the replicas' batches stay full.

Counters. A tenant's counter is the work it was given divided by its weight, in prompt plus
completion tokens (prefill is work): the real tokens of its finished requests (``settled``),
plus its running requests at the best estimate of their size, its moving average of real tokens
per request (all tenants' for a newcomer; before any request finished, the reservation, an
upper bound), re-estimated whenever the average moves. A request thus counts at once when it
is dispatched and at its real size when it ends. (Baking the estimate of the moment into the
counter at dispatch, as a first version did, kept a cold start's reservations, several times
the real size, in the counters of the tenants whose first requests were still running: such a
tenant looked served far beyond its share, got no dispatch, and its requests sorted last in the
engine, so it starved for many seconds.) Backlogged tenants therefore receive tokens in
proportion to their weights. A tenant that was idle (nothing waiting or running, here and at the
other gateways) is lifted, when it comes back, to the smallest counter among the backlogged
tenants (else the active ones, else the largest known): idleness is not banked as credit. The
converse is VTC's bounded lag: at a cold start the first requests take the free slots first
come, first served, and a tenant served past its share then waits until the others
have received as much per weight (at most the dispatch slots' worth of work).

Dynamic engine priority. Each dispatched request carries an engine priority for vLLM's
``scheduling_policy: priority`` (lower runs first): ``tier * TIER_SPAN + start``, where
``start`` is the tenant's counter when the request is dispatched (its virtual start time), in
steps of ``priority_step_tokens``. Tiers dominate; within a tier the engine runs the waiting
requests in the order of their virtual start, as the gateway dispatches them: the tenant
furthest below its share first, and a request never falls behind one dispatched after it for a
tenant that had received more. (A rank relative to the smallest counter of the moment, the first
version, is not comparable across time: an old request ranked a few steps ahead waited behind
every later request ranked 0, while its tenant's counter already held it as served.)
``priority_step_tokens=None`` sends the tier alone (static).

Batch reserve. vLLM preempts a running request only when KV blocks run out, never for a waiting
request of better priority, so with the batch full a light tenant's request, first in the
engine's queue, still waits for one of the running requests to end (up to an engine step).
``reserve_slots`` of this gateway's share of the batch (``batch_slots``) are therefore kept for
tenants below their weighted share of the batch: while another tenant is present (active here or
at another gateway, or within ``RESERVE_HOLD_S`` of a request's end), a tenant holding at least
its share (``batch_slots`` x its weight / the present tenants' weights) is dispatched only while
the requests running here, plus the slots the other tenants freed in the last
``RESERVE_HOLD_S`` and have not taken again, stay below ``batch_slots - reserve_slots``. So the
reserve counts headroom too (requests dispatched beyond the batch wait inside the engine and
would take the reserved slots as soon as they free), and a tenant over its share cannot take the
slot a closed-loop client just freed in the moment before its next request arrives (it would
ratchet into the reserve, one such moment at a time). A tenant below its share may use every
dispatch slot. Alone, a tenant gets every slot (work conserving). The cost: while another tenant
is present but not using them, up to ``reserve_slots`` batch slots (plus the freed slots held
for at most ``RESERVE_HOLD_S``) stay idle, and the tenants over their share get no headroom.

Shared counters. With several gateway replicas the counters are merged through one small actor
per model (:mod:`moestack.scheduling.shared_counters`): :meth:`FairQueue.sync_out` hands over
what changed in the settled counters since the last sync (real tokens, lifts) and this gateway's running estimate per
tenant; :meth:`FairQueue.sync_in` takes back the merged settled counters, the other gateways'
running estimates, and which tenants are active or backlogged there. Between syncs a gateway
runs on its own view; without the shared counters (or while they are lost) it runs on local
counters alone.

Predicted wait. :meth:`FairQueue.predicted_wait_s` estimates, from the queue's state now, how
long a new request of a tenant would wait for its slot: the requests that go first (those of
better tiers, the tenant's own, and the other tenants' of its tier in proportion to their
weights, as VTC serves backlogged tenants) over the rate at which slots free (the slots over the
moving average of how long a request holds one).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

TIER_SPAN = 10**12
"""Engine priorities of one tier: ``tier * TIER_SPAN`` up to ``tier * TIER_SPAN + TIER_SPAN - 1``
(a tier's virtual start times, in ``priority_step_tokens``, stay below that; int64 for vLLM)."""

SHARE_WINDOW_S = 60.0
"""Tokens served over this window give each tenant's share."""

RESERVE_HOLD_S = 1.0
"""For the batch reserve, a tenant holds a slot it freed this long or until it dispatches again
(a closed-loop client comes back within a round trip; its next request must find its slot)."""

MEAN_ALPHA = 0.2
"""Weight of the newest request in a tenant's moving average of real tokens per request."""


@dataclass
class _Waiter:
    tenant: str
    cost_tokens: int
    future: asyncio.Future


@dataclass
class _TenantState:
    name: str
    weight: float = 1.0
    priority: int = 0
    settled: float = 0.0
    """Weighted real tokens of the finished requests, plus lifts (merged across gateways)."""
    inflight: int = 0
    reserved_tokens: int = 0
    """Reservations (upper bounds, in tokens) of the requests running here."""
    running_elsewhere: float = 0.0
    """The other gateways' running estimate for this tenant (weighted tokens), from the shared
    counters."""
    queue: deque[_Waiter] = field(default_factory=deque)
    pending: float = 0.0
    """Weighted real tokens settled here since the last sync."""
    lift: float | None = None
    """Settled value this tenant was lifted to since the last sync."""
    mean_tokens: float | None = None
    """Moving average of the real tokens of this tenant's released requests."""
    holds: deque[float] = field(default_factory=deque)
    """When this tenant's requests here ended (monotonic), for slots it holds for the reserve:
    each is dropped after ``RESERVE_HOLD_S`` or when the tenant dispatches."""

    @property
    def active(self) -> bool:
        return bool(self.queue) or self.inflight > 0


@dataclass(frozen=True)
class SyncOut:
    """What one gateway tells the shared counters about one model."""

    deltas: dict[str, float]
    """Weighted real tokens settled per tenant since the last sync."""
    lifts: dict[str, float]
    """Settled value per tenant lifted since the last sync."""
    counters: dict[str, float]
    """This gateway's full view of the settled counters, to re-seed shared counters that lost
    their state."""
    running: dict[str, float]
    """This gateway's estimate of its running requests per tenant (weighted tokens)."""
    active: dict[str, bool]
    """Tenant -> backlogged here (True) or only running here (False); idle tenants absent."""
    served_tokens: dict[str, int]
    weights: dict[str, float]


@dataclass(frozen=True)
class SyncIn:
    """What the shared counters answer: merged counters, activity elsewhere, shares of served
    tokens."""

    counters: dict[str, float]
    """Merged settled counters."""
    active_elsewhere: dict[str, bool]
    shares: dict[str, float]
    weight_shares: dict[str, float]
    running_elsewhere: dict[str, float] = field(default_factory=dict)
    """The other gateways' running estimates per tenant (weighted tokens)."""


class Slot:
    """A dispatch slot held by one request; release it exactly once with the real token count."""

    def __init__(self, owner: FairQueue, tenant: str, charged_tokens: int, priority: int,
                 dispatched_s: float):
        self._owner, self.tenant, self.charged_tokens = owner, tenant, charged_tokens
        """The request's reservation (an upper bound of its tokens)."""
        self.priority = priority
        """Engine priority of this request (vLLM: lower runs first)."""
        self.dispatched_s = dispatched_s
        """When the slot was taken (the queue's clock)."""
        self._released = False

    def release(self, actual_tokens: int) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self, actual_tokens)


class FairQueue:
    """VTC over one model's dispatch slots; single event loop, no locks needed."""

    def __init__(self, max_inflight: int, priority_step_tokens: float | None = None,
                 batch_slots: int | None = None, reserve_slots: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_inflight = max_inflight
        self.priority_step_tokens = priority_step_tokens
        self.batch_slots = max_inflight if batch_slots is None else batch_slots
        """This gateway's share of the replicas' batch slots (``max_inflight`` less headroom)."""
        self.reserve_slots = reserve_slots
        """Batch slots kept for tenants below their share (see the module docstring)."""
        self.inflight = 0
        self._tenants: dict[str, _TenantState] = {}
        self._mean_tokens: float | None = None  # all tenants': the estimate for newcomers
        self._elsewhere: dict[str, bool] = {}
        self._served: deque[tuple[float, str, int]] = deque()
        self._unsynced_served: dict[str, int] = {}
        self.shared_shares: tuple[dict[str, float], dict[str, float]] | None = None
        """Shares from the shared counters' last answer; None while running on local state."""
        self._hold_timer: asyncio.TimerHandle | None = None
        """Armed for when the oldest slot hold ends (pending while any tenant holds a slot)."""
        self._clock = clock
        self.mean_hold_s: float | None = None
        """Moving average of how long a request held its slot (dispatch to release)."""

    # -- views --------------------------------------------------------------------------------

    def counter(self, state: _TenantState, cold_start: bool = True) -> float:
        """Settled tokens plus the running requests (here and elsewhere) at the best estimate
        of their size, all divided by the weight (see the module docstring); ``cold_start``:
        as :meth:`_running`."""
        return state.settled + self._running(state, cold_start) + state.running_elsewhere

    def _running(self, state: _TenantState, cold_start: bool = True) -> float:
        """The running requests at the moving average of real tokens per request (at most
        their reservations); before any request finished, their reservations, or nothing if
        not ``cold_start``."""
        mean = state.mean_tokens if state.mean_tokens is not None else self._mean_tokens
        if mean is None:
            return state.reserved_tokens / state.weight if cold_start else 0.0
        return min(state.reserved_tokens, state.inflight * mean) / state.weight

    def _lift_floor(self, state: _TenantState) -> float:
        """The counter a returning tenant may be lifted to. Lifts are permanent, so running
        requests count only at a known average: lifting a newcomer to reservations charged
        ahead at a cold start (upper bounds that deflate when the requests end) would put it
        behind work that never existed."""
        return self.counter(state, cold_start=False)

    def _state(self, tenant: str) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState(tenant)
        return state

    def counters(self) -> dict[str, float]:
        return {t: self.counter(s) for t, s in self._tenants.items()}

    def waiting(self) -> int:
        return sum(len(s.queue) for s in self._tenants.values())

    def predicted_wait_s(self, tenant: str, weight: float, tier: int) -> float | None:
        """How long a new request of ``tenant`` (``weight``, priority ``tier``) would wait here
        for a dispatch slot, from the queue's state now; None while unknown (every slot taken
        and no request has ended yet).

        The requests that go first: every waiting request of a better tier, the tenant's own
        waiting ones, and of each other backlogged tenant of its tier as many as VTC serves it
        meanwhile (in proportion to the weights, at most what it has waiting). The slots free
        at ``max_inflight`` per mean hold time. Requests that arrive later for tenants below
        this one's counter can still go first; the batch reserve is not modelled."""
        own = self._tenants.get(tenant)
        mine = len(own.queue) + 1 if own is not None else 1
        ahead = mine - 1
        for s in self._tenants.values():
            if s is own or not s.queue:
                continue
            if s.priority < tier:
                ahead += len(s.queue)
            elif s.priority == tier:
                ahead += min(len(s.queue), mine * s.weight / weight)
        releases = ahead + 1 - max(0, self.max_inflight - self.inflight)
        if releases <= 0:
            return 0.0
        if self.mean_hold_s is None:
            return None
        return releases * self.mean_hold_s / self.max_inflight

    def shares(self, now_s: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """(share of served tokens, share of weight among active tenants) per tenant: the
        shared counters' when shared, else this gateway's own over ``SHARE_WINDOW_S``."""
        if self.shared_shares is not None:
            return self.shared_shares
        now_s = self._clock() if now_s is None else now_s
        while self._served and now_s - self._served[0][0] > SHARE_WINDOW_S:
            self._served.popleft()
        tokens: dict[str, int] = {}
        for _, tenant, n in self._served:
            tokens[tenant] = tokens.get(tenant, 0) + n
        active = {t: s.weight for t, s in self._tenants.items() if s.active}
        return share_of(tokens), share_of(active)

    def set_capacity(self, max_inflight: int, batch_slots: int | None = None,
                     reserve_slots: int | None = None) -> None:
        """Change the slot counts (the model's replicas changed); more slots dispatch waiters."""
        self.max_inflight = max(1, max_inflight)
        self.batch_slots = self.max_inflight if batch_slots is None else batch_slots
        if reserve_slots is not None:
            self.reserve_slots = reserve_slots
        self._fill()

    def may_dispatch(self, state: _TenantState, census: tuple[int, float] | None = None) -> bool:
        """A free dispatch slot, and not one of the batch reserve unless ``state`` is below its
        share or alone (see the module docstring). ``census``: :meth:`_census`, taken once for
        all the candidates of one fill step."""
        if self.inflight >= self.max_inflight:
            return False
        if self.reserve_slots <= 0:
            return True
        held, weight = self._census() if census is None else census
        if self._present(state):  # the others': take this tenant's own part out
            held, weight = held - len(state.holds), weight - state.weight
        if weight <= 0 or self.inflight + held < self.batch_slots - self.reserve_slots:
            return True
        return state.inflight < self.batch_slots * state.weight / (state.weight + weight)

    def _present(self, state: _TenantState) -> bool:
        return state.active or bool(state.holds) or state.name in self._elsewhere

    def _census(self) -> tuple[int, float]:
        """(Slots held, weight) of the tenants present: active here or at another gateway, or
        holding a slot they just freed. One pass over the tenants, dropping expired holds."""
        now, held, weight = self._clock(), 0, 0.0
        for s in self._tenants.values():
            _drop_ended_holds(s, now)
            if self._present(s):
                held += len(s.holds)
                weight += s.weight
        return held, weight

    # -- the request path -----------------------------------------------------------------------

    async def acquire(self, tenant: str, weight: float, priority: int, cost_tokens: int) -> Slot:
        state = self._state(tenant)
        state.weight, state.priority = weight, priority
        if not state.active and tenant not in self._elsewhere:
            self._lift(state)
        if not self.waiting() and self.may_dispatch(state):
            return self._dispatch(state, cost_tokens)
        waiter = _Waiter(tenant, cost_tokens, asyncio.get_running_loop().create_future())
        state.queue.append(waiter)
        self._fill()  # others may wait for the reserve that this tenant may take
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release(0)  # got a slot just as the caller went away
            elif waiter in state.queue:
                state.queue.remove(waiter)
            raise

    def _lift(self, state: _TenantState) -> None:
        """Idle until now (here and at the other gateways): no banked credit. Lifted to the
        smallest counter of the backlogged tenants, else of the active ones, else (nobody
        active) to the largest counter known: with shared counters every gateway knows the same
        ones, so tenants that come back together start together, whichever gateway they reach
        first (the counter of the tenant this gateway happened to dispatch last, VTC's choice,
        differs from gateway to gateway)."""
        others = [(t, s) for t, s in self._tenants.items() if s is not state]
        backlogged = [self._lift_floor(s) for t, s in others if s.queue or self._elsewhere.get(t)]
        active = [self._lift_floor(s) for t, s in others if s.active or t in self._elsewhere]
        floor = (min(backlogged) if backlogged else min(active) if active
                 else max((self._lift_floor(s) for _, s in others), default=0.0))
        if floor > self.counter(state):
            state.settled = floor - self._running(state) - state.running_elsewhere
            state.pending, state.lift = 0.0, state.settled

    def engine_priority(self, state: _TenantState) -> int:
        """``tier * TIER_SPAN + start`` (see the module docstring); the tier alone if static."""
        if self.priority_step_tokens is None:
            return state.priority
        start = int(max(0.0, self.counter(state)) / self.priority_step_tokens)
        return state.priority * TIER_SPAN + min(TIER_SPAN - 1, start)

    def _dispatch(self, state: _TenantState, cost_tokens: int) -> Slot:
        priority = self.engine_priority(state)
        self.inflight += 1
        state.inflight += 1
        if state.holds:
            state.holds.popleft()
        state.reserved_tokens += cost_tokens
        return Slot(self, state.name, cost_tokens, priority, self._clock())

    def _release(self, slot: Slot, actual_tokens: int) -> None:
        self.inflight -= 1
        state = self._tenants[slot.tenant]
        state.inflight -= 1
        state.reserved_tokens -= slot.charged_tokens
        if self.reserve_slots > 0:
            state.holds.append(self._clock())
            if self._hold_timer is None:  # else armed for an older hold, which re-arms it
                self._arm_hold_timer(RESERVE_HOLD_S)
        state.settled += actual_tokens / state.weight
        state.pending += actual_tokens / state.weight
        if actual_tokens:  # a request that did no work (refused, gone) says nothing of sizes
            self.mean_hold_s = moving_mean(self.mean_hold_s, self._clock() - slot.dispatched_s)
            state.mean_tokens = moving_mean(state.mean_tokens, actual_tokens)
            self._mean_tokens = moving_mean(self._mean_tokens, actual_tokens)
            self._served.append((self._clock(), slot.tenant, actual_tokens))
            self._unsynced_served[slot.tenant] = (self._unsynced_served.get(slot.tenant, 0)
                                                  + actual_tokens)
        self._fill()

    def _fill(self) -> None:
        while self.inflight < self.max_inflight:
            census = self._census() if self.reserve_slots > 0 else None
            best = min((s for s in self._tenants.values()
                        if s.queue and self.may_dispatch(s, census)),
                       key=lambda s: (s.priority, self.counter(s)), default=None)
            if best is None:
                return
            waiter = best.queue.popleft()
            if waiter.future.done():  # cancelled while waiting
                continue
            waiter.future.set_result(self._dispatch(best, waiter.cost_tokens))

    def _arm_hold_timer(self, delay_s: float) -> None:
        try:
            self._hold_timer = asyncio.get_running_loop().call_later(delay_s, self._holds_ended)
        except RuntimeError:
            pass  # no event loop: nobody can be waiting

    def _holds_ended(self) -> None:
        """The oldest slot hold ended: let the others take the slot, then wait for the next
        hold to end (holds taken up again by their tenants' next requests need no wake-up)."""
        self._hold_timer = None
        self._fill()
        now = self._clock()
        for s in self._tenants.values():
            _drop_ended_holds(s, now)
        oldest = min((s.holds[0] for s in self._tenants.values() if s.holds), default=None)
        if oldest is not None:
            self._arm_hold_timer(oldest + RESERVE_HOLD_S - now)

    # -- shared counters ----------------------------------------------------------------------

    def sync_out(self) -> SyncOut:
        """What changed since the last sync (then forgotten here: the shared counters hold
        it)."""
        out = SyncOut(
            deltas={t: s.pending for t, s in self._tenants.items() if s.pending},
            lifts={t: s.lift for t, s in self._tenants.items() if s.lift is not None},
            counters={t: s.settled for t, s in self._tenants.items()},
            running={t: self._running(s) for t, s in self._tenants.items() if s.inflight},
            active={t: bool(s.queue) for t, s in self._tenants.items() if s.active},
            served_tokens=self._unsynced_served,
            weights={t: s.weight for t, s in self._tenants.items()})
        for s in self._tenants.values():
            s.pending, s.lift = 0.0, None
        self._unsynced_served = {}
        return out

    def sync_in(self, merged: SyncIn | None) -> None:
        """Take the merged counters (plus what was settled here since ``sync_out``); None
        (shared counters lost): carry on with the local counters, forget other gateways."""
        if merged is None:
            self._elsewhere, self.shared_shares = {}, None
            for state in self._tenants.values():
                state.running_elsewhere = 0.0
            return
        for tenant, settled in merged.counters.items():
            state = self._state(tenant)
            base = settled if state.lift is None else max(settled, state.lift)
            state.settled = base + state.pending
        for tenant in merged.running_elsewhere:
            self._state(tenant)
        for tenant, state in self._tenants.items():
            state.running_elsewhere = merged.running_elsewhere.get(tenant, 0.0)
        self._elsewhere = dict(merged.active_elsewhere)
        self.shared_shares = (dict(merged.shares), dict(merged.weight_shares))
        self._fill()


def _drop_ended_holds(state: _TenantState, now: float) -> None:
    while state.holds and now - state.holds[0] >= RESERVE_HOLD_S:
        state.holds.popleft()


def moving_mean(mean: float | None, value: float) -> float:
    return value if mean is None else MEAN_ALPHA * value + (1 - MEAN_ALPHA) * mean


def share_of(amounts: dict[str, float]) -> dict[str, float]:
    total = sum(amounts.values())
    return {k: v / total for k, v in amounts.items()} if total else {}
