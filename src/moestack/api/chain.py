"""The request path of one gateway replica: its hooks, composed from config and run in order.

:func:`build_hooks` composes the chain (see :mod:`moestack.hooks` for the protocol):
tenancy's authentication and admission when tenancy is on, the scheduler's fair queue, metering
always. :class:`HookChain` runs it: the routes' dependency runs ``on_request``
(:mod:`moestack.api.context`), the relay ``before_inference`` and ``on_complete``
(:mod:`moestack.api.relay`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from moestack.hooks import RequestContext, RequestHook
from moestack.metering.hook import Metering, UsageSink
from moestack.metering.metrics import GatewayMetrics
from moestack.scheduling import Scheduler
from moestack.scheduling.hook import Scheduling
from moestack.tenancy import Tenancy
from moestack.tenancy.hooks import Admission, Authentication

log = logging.getLogger(__name__)


class HookChain:
    """Hooks in order: ``on_request`` and ``before_inference`` first to last, ``on_complete``
    last to first over the hooks whose ``before_inference`` returned. A hook is called only at
    the points it overrides."""

    def __init__(self, hooks: Sequence[RequestHook] = ()):
        self.hooks = tuple(hooks)
        self._on_request = [h for h in self.hooks if _overrides(h, "on_request")]
        self._before = [(h, _overrides(h, "before_inference")) for h in self.hooks]
        self._on_complete = [_overrides(h, "on_complete") for h in self.hooks]

    async def on_request(self, ctx: RequestContext) -> None:
        for hook in self._on_request:
            await hook.on_request(ctx)

    async def before_inference(self, ctx: RequestContext) -> None:
        for hook, called in self._before[ctx.hooks_entered:]:
            if called:
                await hook.before_inference(ctx)
            ctx.hooks_entered += 1

    async def on_complete(self, ctx: RequestContext) -> None:
        entered, ctx.hooks_entered = ctx.hooks_entered, 0
        for i in reversed(range(entered)):
            if not self._on_complete[i]:
                continue
            try:
                await self.hooks[i].on_complete(ctx)
            except Exception:  # fail open on purpose: every other hook must still release
                log.exception("request hook %s failed to complete request %s",
                              type(self.hooks[i]).__name__, ctx.request_id)


def _overrides(hook: RequestHook, point: str) -> bool:
    return getattr(type(hook), point) is not getattr(RequestHook, point)


def build_hooks(metrics: GatewayMetrics, sinks: Sequence[UsageSink] = (),
                tenancy: Tenancy | None = None,
                scheduler: Scheduler | None = None,
                overflow: RequestHook | None = None) -> HookChain:
    """The request path of one gateway replica (see :mod:`moestack.hooks`): authentication and
    admission when there is ``tenancy``, the fair queue when there is a ``scheduler``, metering
    (``metrics`` and the other usage ``sinks``) always; ``overflow``
    (:class:`moestack.api.overflow.Overflow`) between admission and the fair queue."""
    hooks: list[RequestHook] = []
    if tenancy is not None:
        hooks += [Authentication(tenancy),
                  Admission(tenancy, on_budget_remaining=metrics.set_budget_remaining)]
    if overflow is not None:
        hooks.append(overflow)
    if scheduler is not None:
        hooks.append(Scheduling(scheduler))
    hooks.append(Metering(metrics, sinks))
    return HookChain(hooks)
