"""Weighted, token-based, work-conserving fair queue: Virtual Token Counter (VTC).

After Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024.

Each model has ``max_inflight`` dispatch slots (per gateway replica; the gateway follows the
model's live replica count, see :meth:`FairQueue.set_capacity`). A request takes a slot at
once if one is free and nobody waits (work conserving: idle share goes to whoever has work).
Otherwise it waits; when a slot frees, the waiting request that goes next is the first one of the
tenant in the best priority tier (lowest number, as in vLLM) with the smallest virtual token
counter. A tenant's counter grows by ``tokens / weight`` for the work it is given (its reservation
at dispatch, corrected by the real count at release), so backlogged tenants receive tokens in
proportion to their weights. A tenant that was idle (nothing waiting or running) is lifted to the
smallest counter among the backlogged tenants (or the counter of the last dispatched one) when it
comes back, so idleness is not banked as credit; a tenant with requests running is active and
keeps its counter (closed-loop clients briefly have nothing waiting between two requests).

Fairness state is per gateway replica: limits are global (database), while the Serve proxy spreads
requests evenly over gateway replicas, so each replica orders a proportional sample of the same
tenant mix and the union of fair schedules is fair.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


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


class Slot:
    """A dispatch slot held by one request; release it exactly once with the real token count."""

    def __init__(self, owner: FairQueue, tenant: str, charged_tokens: int):
        self._owner, self.tenant, self.charged_tokens = owner, tenant, charged_tokens
        self._released = False

    def release(self, actual_tokens: int) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self, actual_tokens)


class FairQueue:
    """VTC over one model's dispatch slots; single event loop, no locks needed."""

    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight
        self.inflight = 0
        self._tenants: dict[str, _TenantState] = {}
        self._last_counter = 0.0

    def counters(self) -> dict[str, float]:
        return {t: s.counter for t, s in self._tenants.items()}

    def waiting(self) -> int:
        return sum(len(s.queue) for s in self._tenants.values())

    def set_capacity(self, max_inflight: int) -> None:
        """Change the slot count (the model's replicas changed); more slots dispatch waiters."""
        self.max_inflight = max(1, max_inflight)
        self._fill()

    async def acquire(self, tenant: str, weight: float, priority: int, cost_tokens: int) -> Slot:
        state = self._tenants.setdefault(tenant, _TenantState())
        state.weight, state.priority = weight, priority
        if not state.queue and not state.inflight:  # idle until now: no banked credit
            backlogged = [s.counter for s in self._tenants.values() if s.queue]
            state.counter = max(state.counter, min(backlogged) if backlogged
                                else self._last_counter)
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

    def _dispatch(self, state: _TenantState, tenant: str, cost_tokens: int) -> Slot:
        self._last_counter = state.counter  # where the newest work started
        self.inflight += 1
        state.inflight += 1
        state.counter += cost_tokens / state.weight
        return Slot(self, tenant, cost_tokens)

    def _release(self, slot: Slot, actual_tokens: int) -> None:
        self.inflight -= 1
        state = self._tenants[slot.tenant]
        state.inflight -= 1
        state.counter += (actual_tokens - slot.charged_tokens) / state.weight
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
