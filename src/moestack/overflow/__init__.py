"""Overflow: external providers (OpenAI-compatible or Anthropic APIs) that stand in for a model
when the cluster is full, for the tenants that opted in.

:mod:`.providers` relays a request to a provider (the client's body with ``model`` rewritten,
the provider's bytes and usage back, as engine chunks); :mod:`.decision` says whether a request
overflows. The gateway composes them with the fair queue's predicted wait and the tenant's
overflow budget (:mod:`moestack.api.overflow`); metering prices provider tokens at the provider's
prices (:mod:`moestack.metering.provider_prices`).
"""

from moestack.overflow.decision import ALLOWED, NEVER, Trigger, should_overflow
from moestack.overflow.providers import PATHS, Provider, ProviderError

__all__ = ["ALLOWED", "NEVER", "PATHS", "Provider", "ProviderError", "Trigger",
           "should_overflow"]
