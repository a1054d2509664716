"""The pricing catalog: proprietary API baselines and USD per accelerator-hour.

The embedded default is ``pricing.yaml`` next to this module (``deploy/pricing.yaml`` in the
repository); a deployment points ``pricing_file`` at its own copy and may override single
accelerator prices with ``cost.usd_per_gpu_hour`` in the stack config.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moestack.config.loader import read_yaml
from moestack.errors import ConfigError

EMBEDDED_PRICING = "pricing.yaml"
CPU = "cpu"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BaselinePrice(_Strict):
    """List prices of one proprietary API model, USD per 1M tokens."""

    provider: str = Field(description="Company selling the API.")
    usd_per_1m_input_tokens: float = Field(ge=0, description="USD per 1M uncached prompt tokens.")
    usd_per_1m_cached_input_tokens: float = Field(ge=0, description="USD per 1M prompt tokens "
                                                  "read from the provider's prompt cache.")
    usd_per_1m_output_tokens: float = Field(ge=0, description="USD per 1M completion tokens.")
    source: str = Field(min_length=1, description="Where the figures were read (URL and tier).")
    as_of: dt.date = Field(description="Date the figures were read.")

    def usd(self, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int) -> float:
        """USD these tokens cost at this API; cached tokens are part of ``prompt_tokens``."""
        cached = min(cached_prompt_tokens, prompt_tokens)
        return ((prompt_tokens - cached) * self.usd_per_1m_input_tokens
                + cached * self.usd_per_1m_cached_input_tokens
                + completion_tokens * self.usd_per_1m_output_tokens) / 1e6


class PricingCatalog(_Strict):
    """Baseline API prices and USD per accelerator-hour (see ``deploy/pricing.yaml``)."""

    version: int = Field(1, ge=1, le=1, description="Catalog format version.")
    currency: str = Field("USD", pattern="^USD$", description="Currency of every price.")
    baselines: dict[str, BaselinePrice] = Field(min_length=1, description="Baseline API name -> "
                                                "its prices.")
    gpu_usd_per_hour: dict[str, float] = Field(alias="usd_per_gpu_hour", description=(
        "Accelerator kind (H100, H200, A100, L40S, B200, ...) -> USD per accelerator-hour; "
        "`cpu` -> USD per CPU-hour. Key `usd_per_gpu_hour` in YAML."))
    prices_as_of: dt.date = Field(description="Date the catalog as a whole was last checked.")

    @field_validator("gpu_usd_per_hour")
    @classmethod
    def _positive_and_has_cpu(cls, v: dict[str, float]) -> dict[str, float]:
        if bad := sorted(k for k, p in v.items() if not p >= 0):
            raise ValueError(f"prices must be >= 0: {', '.join(bad)}")
        if CPU not in v:
            raise ValueError("needs a `cpu` entry (USD per CPU-hour) for CPU nodes")
        return {_norm(k): p for k, p in v.items()}

    def usd_per_gpu_hour(self, accelerator: str) -> float:
        """USD per hour of one accelerator of this kind (``cpu``: per CPU).

        Ray's spellings are accepted: ``accelerator_type:H100``, ``h100``, ``A100-80G`` (a memory
        suffix falls back to the base kind). Raises :class:`ConfigError` for unknown kinds.
        """
        kind = _norm(accelerator.removeprefix("accelerator_type:"))
        for candidate in (kind, kind.split("-")[0]):
            if candidate in self.gpu_usd_per_hour:
                return self.gpu_usd_per_hour[candidate]
        known = ", ".join(sorted(self.gpu_usd_per_hour))
        raise ConfigError(f"no USD per GPU-hour for accelerator `{accelerator}` in the pricing "
                          f"catalog (known: {known}); add it under `usd_per_gpu_hour` or in "
                          "the config's `cost.usd_per_gpu_hour`")

    def with_gpu_prices(self, overrides: Mapping[str, float]) -> PricingCatalog:
        """A copy whose accelerator prices are replaced by ``overrides`` where given."""
        if not overrides:
            return self
        merged = {**self.gpu_usd_per_hour, **{_norm(k): v for k, v in overrides.items()}}
        return self.model_copy(update={"gpu_usd_per_hour": merged})


def _norm(kind: str) -> str:
    return CPU if kind.lower() == CPU else kind.upper()


def embedded_pricing_path() -> Path:
    return Path(str(resources.files("moestack.metering").joinpath(EMBEDDED_PRICING)))


def load_pricing(path: Path | None = None,
                 gpu_price_overrides: Mapping[str, float] | None = None) -> PricingCatalog:
    """Read and check the catalog at ``path`` (``None``: the embedded default).

    ``gpu_price_overrides`` (accelerator kind -> USD per hour) replace single catalog prices.
    Raises :class:`ConfigError` naming each bad field.
    """
    path = Path(path) if path is not None else embedded_pricing_path()
    raw = read_yaml(path, "pricing catalog")
    return parse_pricing(raw, source=str(path), gpu_price_overrides=gpu_price_overrides)


def parse_pricing(raw: object, source: str = "<pricing>",
                  gpu_price_overrides: Mapping[str, float] | None = None) -> PricingCatalog:
    from moestack.config.loader import format_validation_error

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the pricing catalog must be a mapping")
    try:
        catalog = PricingCatalog.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    return catalog.with_gpu_prices(gpu_price_overrides or {})
