"""Overflow in the request path: send an opted-in tenant's request to an external provider when
the cluster is full, within the tenant's overflow budget.

:class:`Overflow` is a request hook between admission and the fair queue (see
:mod:`moestack.hooks`):

* ``before_inference``: if the tenant's policy is ``allowed``, the model has a rule whose
  provider serves the endpoint and has room, and the tenant's predicted wait in the model's fair
  queue (:meth:`~moestack.scheduling.Scheduler.predicted_wait_s`) is over the rule's
  ``max_queue_wait_ms``, reserve the request's upper bound at the provider's prices against the
  tenant's overflow budget; if that holds, the request's backend becomes ``provider:<name>``
  (the fair queue then takes no slot for it). A refused reservation changes nothing: the
  request waits, as for a tenant that never overflows. A request predicted to wait less waits
  at most ``max_queue_wait_ms`` (the prediction is a mean; later arrivals of tenants below
  their share go first): past it, :meth:`Overflow.after_queue_wait` sends it to the provider
  (same checks), so the opted-in tenant's TTFT stays within the bound plus the provider's.
* :meth:`Overflow.take_over`: the relay calls it when no replica could take the request
  (today's 503 before the first byte); the same checks, triggered by the rule's
  ``on_no_healthy_replica``.
* ``on_complete``: settle the overflow reservation with what the provider billed (metering
  priced the provider's own usage at the provider's prices).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Mapping

from moestack.config.schema import MoestackConfig
from moestack.engine.protocol import EngineChunk
from moestack.hooks import RequestContext, RequestHook
from moestack.metering.cost import CostModel
from moestack.metering.provider_prices import PROVIDER_PREFIX
from moestack.overflow import Provider, Trigger, should_overflow
from moestack.scheduling import Scheduler
from moestack.tenancy.overflow_budget import OverflowBudget, OverflowHold

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
"""Client headers passed on to an Anthropic provider (the API version the client speaks)."""


class Overflow(RequestHook):
    """The overflow decision and reservation of one gateway replica."""

    def __init__(self, config: MoestackConfig, providers: Mapping[str, Provider],
                 cost_model: CostModel, scheduler: Scheduler | None,
                 budget: OverflowBudget | None):
        self.config = config
        self.providers = dict(providers)
        self.cost_model = cost_model
        self.scheduler = scheduler
        self.budget = budget
        self._holds: weakref.WeakKeyDictionary[RequestContext, OverflowHold] = \
            weakref.WeakKeyDictionary()

    @classmethod
    def from_config(cls, config: MoestackConfig, cost_model: CostModel,
                    scheduler: Scheduler | None, budget: OverflowBudget | None) -> Overflow:
        return cls(config, {p.name: Provider(p) for p in config.overflow.providers}, cost_model,
                   scheduler, budget)

    def _provider(self, ctx: RequestContext) -> Provider | None:
        if getattr(ctx, "adapter", None):  # a tenant's LoRA adapter exists on our replicas only
            return None
        rule = self.config.overflow.rule(ctx.facts.model)
        provider = self.providers.get(rule.provider) if rule is not None else None
        if provider is None or not provider.serves(ctx.endpoint) or not provider.has_room():
            return None
        return provider

    async def before_inference(self, ctx: RequestContext) -> None:
        p = ctx.principal
        if p is None or p.overflow_policy != "allowed" or self.scheduler is None:
            return
        provider = self._provider(ctx)
        if provider is None:
            return
        rule = self.config.overflow.rule(ctx.facts.model)
        wait_s = self.scheduler.predicted_wait_s(ctx.facts.model, p.tenant, p.weight, p.priority)
        if should_overflow(p.overflow_policy, rule, True, Trigger.QUEUE_WAIT, wait_s) and \
                await self._take(ctx, provider):
            return
        if rule.max_queue_wait_ms is not None:  # the prediction may be short: bound the wait
            ctx.max_queue_wait_s = rule.max_queue_wait_ms / 1000

    async def after_queue_wait(self, ctx: RequestContext) -> None:
        """The request waited its bound in the fair queue: to the provider if it still can,
        else it waits on without a bound."""
        ctx.max_queue_wait_s = None
        provider = self._provider(ctx)
        if provider is not None:
            await self._take(ctx, provider)

    async def take_over(self, ctx: RequestContext) -> bool:
        """No replica could take the request: whether it goes to a provider instead."""
        p = ctx.principal
        if p is None or ctx.backend != "replica" or ctx.facts is None:
            return False
        provider = self._provider(ctx)
        if provider is None or not should_overflow(
                p.overflow_policy, self.config.overflow.rule(ctx.facts.model), True,
                Trigger.NO_REPLICA):
            return False
        return await self._take(ctx, provider)

    async def _take(self, ctx: RequestContext, provider: Provider) -> bool:
        price = self.cost_model.providers[provider.name]
        bound = ctx.tokens
        usd = price.usd(bound.prompt_tokens, 0, bound.completion_tokens)
        if self.budget is not None:
            reserving = asyncio.ensure_future(
                self.budget.reserve(ctx.principal, ctx.request_id, provider.backend, usd))
            try:
                hold = await asyncio.shield(reserving)
            except asyncio.CancelledError:  # the client left: give back what was held
                reserving.add_done_callback(
                    lambda f: not f.cancelled() and f.exception() is None
                    and f.result() is not None and self.budget.settle(f.result(), 0.0))
                raise
            if hold is None:
                return False
            self._holds[ctx] = hold
        ctx.backend = provider.backend
        return True

    def serve(self, ctx: RequestContext, raw: bytes,
              headers: Mapping[str, str]) -> AsyncIterator[EngineChunk]:
        """The provider's answer to the client's body ``raw`` (as engine chunks)."""
        provider = self.providers[ctx.backend.removeprefix(PROVIDER_PREFIX)]
        return provider.serve(ctx.endpoint, raw, ctx.tokens.prompt_tokens,
                              {h: headers[h] for h in FORWARDED_HEADERS if h in headers})

    async def on_complete(self, ctx: RequestContext) -> None:
        hold = self._holds.pop(ctx, None)
        if hold is not None and self.budget is not None and ctx.cost is not None:
            self.budget.settle(hold, ctx.cost.provider_usd)  # unpriced: the hold stays (bound)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
