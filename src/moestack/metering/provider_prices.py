"""Prices of the overflow providers: each provider's own per-token prices where the config gives
them, else the pricing catalog's baseline of the same name (``baseline``, default the provider's
model id), so ``gpt-5.4`` overflow is priced as the ``gpt-5.4`` baseline in ``pricing.yaml``."""

from __future__ import annotations

from moestack.config.schema import OverflowProviderConfig
from moestack.errors import ConfigError
from moestack.metering.pricing import BaselinePrice, PricingCatalog

PROVIDER_PREFIX = "provider:"
"""A request's backend, when a provider answered it: ``provider:<name>``."""


def provider_price(provider: OverflowProviderConfig, catalog: PricingCatalog) -> BaselinePrice:
    """USD per 1M tokens at ``provider``; :class:`ConfigError` if neither the config nor the
    catalog prices it."""
    base = catalog.baselines.get(provider.baseline or provider.model)
    given = (provider.usd_per_1m_input_tokens, provider.usd_per_1m_output_tokens)
    if base is None and None in given:
        raise ConfigError(
            f"overflow.providers[{provider.name}]: no price: set usd_per_1m_input_tokens and "
            f"usd_per_1m_output_tokens, or `baseline` to a pricing-catalog baseline (known: "
            f"{', '.join(sorted(catalog.baselines))})")
    input_usd = (provider.usd_per_1m_input_tokens if provider.usd_per_1m_input_tokens
                 is not None else base.usd_per_1m_input_tokens)
    cached = provider.usd_per_1m_cached_input_tokens
    if cached is None:
        cached = base.usd_per_1m_cached_input_tokens if base is not None else input_usd
    return BaselinePrice(
        provider=base.provider if base is not None else provider.name,
        usd_per_1m_input_tokens=input_usd, usd_per_1m_cached_input_tokens=cached,
        usd_per_1m_output_tokens=(provider.usd_per_1m_output_tokens if
                                  provider.usd_per_1m_output_tokens is not None
                                  else base.usd_per_1m_output_tokens),
        source=base.source if base is not None and None in given else "stack config",
        as_of=base.as_of if base is not None else catalog.prices_as_of)


def provider_prices(providers: list[OverflowProviderConfig],
                    catalog: PricingCatalog) -> dict[str, BaselinePrice]:
    """Provider name -> its prices (checked when the cost model is built)."""
    return {p.name: provider_price(p, catalog) for p in providers}
