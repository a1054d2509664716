"""The scheduling hook of the request path: a fair dispatch slot per request.

``before_inference`` waits for the slot of the request's model in fair order (tenant, weight and
tier from the context's principal; the request's token bound as its size until it ends) and
puts the slot's engine priority on the context; ``on_complete`` releases the slot with the real
token count. A request that leaves while it waits takes no slot (the queue forgets it).
"""

from __future__ import annotations

import weakref

from moestack.errors import AuthenticationError
from moestack.hooks import RequestContext, RequestHook
from moestack.scheduling.fair_queue import Slot
from moestack.scheduling.scheduler import Scheduler


class Scheduling(RequestHook):
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._slots: weakref.WeakKeyDictionary[RequestContext, Slot] = \
            weakref.WeakKeyDictionary()

    async def before_inference(self, ctx: RequestContext) -> None:
        p = ctx.principal
        if p is None:  # the fair queue orders tenants: it runs after authentication
            raise AuthenticationError.missing_key()
        slot = await self.scheduler.acquire(ctx.facts.model, p.tenant, p.weight, p.priority,
                                            ctx.tokens.total)
        self._slots[ctx] = slot
        ctx.priority = slot.priority

    async def on_complete(self, ctx: RequestContext) -> None:
        slot = self._slots.pop(ctx, None)
        if slot is not None:
            slot.release(ctx.record.prompt_tokens + ctx.record.completion_tokens)
