"""The scheduling hook of the request path: a fair dispatch slot per request.

``before_inference`` waits for the slot of the request's model in fair order (tenant, weight and
tier from the context's principal; the request's token bound as its size until it ends) and
puts the slot's engine priority on the context; ``on_complete`` releases the slot with the real
token count. A request that leaves while it waits takes no slot (the queue forgets it), nor does
one whose ``max_queue_wait_s`` (set by overflow) passes first: that raises
:class:`QueueWaitExceeded`, and the request may go on (without the bound) through
``before_inference`` again.
"""

from __future__ import annotations

import asyncio
import weakref

from moestack.errors import AuthenticationError, MoestackError
from moestack.hooks import RequestContext, RequestHook
from moestack.scheduling.fair_queue import Slot
from moestack.scheduling.scheduler import Scheduler


class QueueWaitExceeded(MoestackError):
    """The request waited ``max_queue_wait_s`` in the fair queue without a slot."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "queue_wait_exceeded"


class Scheduling(RequestHook):
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._slots: weakref.WeakKeyDictionary[RequestContext, Slot] = \
            weakref.WeakKeyDictionary()

    async def before_inference(self, ctx: RequestContext) -> None:
        p = ctx.principal
        if p is None:  # the fair queue orders tenants: it runs after authentication
            raise AuthenticationError.missing_key()
        if ctx.backend != "replica":  # overflowed to a provider: it takes no replica's slot
            return
        waiting = self.scheduler.acquire(ctx.facts.model, p.tenant, p.weight, p.priority,
                                         ctx.tokens.total)
        if ctx.max_queue_wait_s is None:
            slot = await waiting
        else:
            try:
                slot = await asyncio.wait_for(waiting, max(0.0, ctx.max_queue_wait_s))
            except asyncio.TimeoutError:
                raise QueueWaitExceeded("waited the tenant's bound in the fair queue") from None
        self._slots[ctx] = slot
        ctx.priority = slot.priority

    async def on_complete(self, ctx: RequestContext) -> None:
        slot = self._slots.pop(ctx, None)
        if slot is not None:
            slot.release(ctx.record.prompt_tokens + ctx.record.completion_tokens)
