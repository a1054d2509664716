"""The tenancy hooks of the request path: who is calling, and may they, and what they pay.

* :class:`Authentication` (``on_request``, before the body is read): the bearer key's principal,
  or 401 (429 for an address past its failed attempts, 503 if the store cannot answer).
* :class:`Admission` (``before_inference``): reserve the request's token bound at the tenant's
  prices, check the tenant's limits and budget and write its ledger row ahead, or 429/503; puts
  the tenant's prefix-cache salt on the context. ``on_complete``: settle the row with the price
  metering put on the context (the request is priced once, by metering).

The model access check needs no hook: the principal on the context carries the tenant's model
list, and the API layer resolves the model for the caller (a model outside the list is the same
404 as a missing one).
"""

from __future__ import annotations

from collections.abc import Callable

from moestack.errors import AuthenticationError
from moestack.hooks import RequestContext, RequestHook
from moestack.tenancy.service import Tenancy


class Authentication(RequestHook):
    def __init__(self, tenancy: Tenancy):
        self.tenancy = tenancy

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.principal = await self.tenancy.auth.principal(ctx.api_key, ctx.client)


class Admission(RequestHook):
    def __init__(self, tenancy: Tenancy,
                 on_budget_remaining: Callable[[str, float], None] | None = None):
        self.tenancy = tenancy
        self.on_budget_remaining = on_budget_remaining
        """Told (tenant, USD left net of running reservations) at each admission with a
        budget."""

    async def before_inference(self, ctx: RequestContext) -> None:
        principal, facts = ctx.principal, ctx.facts
        if principal is None:  # admission runs after authentication
            raise AuthenticationError.missing_key()
        reservation = self.tenancy.reservation(facts.model, ctx.tokens, ctx.request_id,
                                               facts.budget_field, ctx.adapter_usd_per_1m_tokens)
        remaining = await self.tenancy.admit(principal, reservation, facts.model, ctx.endpoint,
                                             facts.stream)
        ctx.cache_salt = self.tenancy.cache_salt(principal.tenant_id)
        if remaining is not None and self.on_budget_remaining is not None:
            self.on_budget_remaining(principal.tenant, remaining)

    async def on_complete(self, ctx: RequestContext) -> None:
        self.tenancy.settle(ctx.record, ctx.cost, ctx.principal.tenant_id)
