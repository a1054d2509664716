"""Schema of load-test scenario files (``loadtest/scenarios/*.yaml``).

A scenario says who sends (a tenant mix, each tenant with its own API key), when (Poisson,
bursty or constant arrivals), what (prompt and output length distributions, a shared-prefix
share, streaming or not) and what counts as good (SLOs for goodput). It is checked with pydantic
when loaded; an unknown or ill-typed field is an error naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moestack.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthDistribution(_Strict):
    """A distribution of token counts; samples are rounded and clipped to [min, max]."""

    kind: Literal["fixed", "uniform", "normal", "lognormal"] = Field(
        "fixed", description="fixed: always `mean`; uniform: between `min` and `max`; normal or "
        "lognormal: `mean` and `stddev` (lognormal: of the token count, not its log).")
    mean: float = Field(gt=0, description="Mean token count.")
    stddev: float = Field(0.0, ge=0, description="Standard deviation in tokens "
                          "(normal, lognormal).")
    min: int = Field(1, ge=1, description="Smallest token count.")
    max: int = Field(1_000_000, ge=1, description="Largest token count.")

    @model_validator(mode="after")
    def _ordered(self) -> LengthDistribution:
        if self.min > self.max:
            raise ValueError("`min` must not exceed `max`")
        return self


class ArrivalConfig(_Strict):
    """When requests start (open loop: arrivals do not wait for earlier requests)."""

    process: Literal["poisson", "bursty", "constant"] = Field(
        "poisson", description="poisson: exponential gaps at `rate_rps`; bursty: gamma-"
        "distributed gaps with the same mean rate and coefficient of variation `burstiness_cv` "
        "(vLLM bench's burstiness is 1/cv^2); constant: evenly spaced.")
    rate_rps: float | None = Field(None, gt=0, description="Mean arrival rate in requests per "
                                   "second; unset sends everything at once (closed loop bounded "
                                   "by `max_concurrency`).")
    burstiness_cv: float = Field(3.0, gt=0, description="Coefficient of variation of the gaps "
                                 "for `bursty` (1 is Poisson; larger is burstier).")


class TenantLoad(_Strict):
    """One tenant of the mix."""

    name: str = Field(min_length=1, max_length=64, description="Tenant name (used in reports).")
    share: float = Field(1.0, gt=0, description="Relative share of requests this tenant sends.")
    weight: float = Field(1.0, gt=0, description="Fair-share weight the server is expected to "
                          "give this tenant; token shares are normalised by it for Jain's index.")
    api_key_env: str | None = Field(None, description="Environment variable holding this "
                                    "tenant's API key; unset uses the --api-key of the run.")
    prompt_tokens: LengthDistribution | None = Field(None, description="Overrides the "
                                                     "scenario's prompt lengths.")
    output_tokens: LengthDistribution | None = Field(None, description="Overrides the "
                                                     "scenario's output lengths.")


class SharedPrefixConfig(_Strict):
    """Part of the requests start with a common prefix (system prompt, few-shot examples)."""

    fraction: float = Field(0.0, ge=0, le=1, description="Share of requests that carry a "
                            "shared prefix.")
    prefix_tokens: int = Field(0, ge=0, description="Length of the shared prefix in tokens "
                               "(counted within the request's prompt length when it fits).")
    num_prefixes: int = Field(1, ge=1, description="Distinct prefixes the requests pick from.")


class SloConfig(_Strict):
    """Service-level objectives; a request counts toward goodput when it meets all that are set
    (the same rule as ``vllm bench serve --goodput``)."""

    ttft_s: float | None = Field(None, gt=0, description="Most time to first token, seconds.")
    tpot_s: float | None = Field(None, gt=0, description="Most time per output token after the "
                                 "first, seconds.")
    e2e_s: float | None = Field(None, gt=0, description="Most end-to-end latency, seconds.")


class CostConfig(_Strict):
    """What the serving deployment costs while the run lasts, for self-hosted USD per 1M tokens."""

    usd_per_hour: float | None = Field(None, ge=0, description="USD per hour of the whole "
                                       "deployment; overrides `accelerator`.")
    accelerator: str | None = Field(None, description="Accelerator type in the pricing catalog "
                                    "(e.g. H100) priced per GPU-hour.")
    accelerator_count: int = Field(1, ge=1, description="Accelerators of that type in use.")


class Scenario(_Strict):
    """Root of a scenario file."""

    name: str = Field(min_length=1, description="Scenario name (used in reports and file names).")
    description: str = Field("", description="What the scenario imitates.")
    model: str = Field(min_length=1, description="Model id sent in every request.")
    endpoint: Literal["chat", "completions"] = Field("chat", description="chat: "
                                                     "/v1/chat/completions; completions: "
                                                     "/v1/completions.")
    stream: bool = Field(True, description="Stream responses (TTFT and ITL need streaming).")
    num_requests: int = Field(ge=1, description="Requests to send.")
    max_concurrency: int = Field(64, ge=1, description="Most requests in flight at once.")
    seed: int = Field(0, description="Seed of arrivals, tenant picks, lengths and prompt words.")
    warmup_requests: int = Field(0, ge=0, description="Requests sent (one at a time) before the "
                                 "measured run and left out of the report.")
    timeout_s: float = Field(300.0, gt=0, description="Per-request timeout, seconds.")
    ignore_eos: bool = Field(True, description="Ask the server to generate exactly the sampled "
                             "output length (vLLM `ignore_eos`, relayed by moestack).")
    arrival: ArrivalConfig = Field(default_factory=ArrivalConfig, description="Arrivals.")
    tenants: list[TenantLoad] = Field(min_length=1, description="The tenant mix.")
    prompt_tokens: LengthDistribution = Field(description="Prompt lengths in tokens.")
    output_tokens: LengthDistribution = Field(description="Output (max_tokens) lengths.")
    shared_prefix: SharedPrefixConfig = Field(default_factory=SharedPrefixConfig,
                                              description="Shared-prefix share.")
    slo: SloConfig = Field(default_factory=SloConfig, description="SLOs for goodput.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Deployment cost.")

    def replace(self, **changes) -> Scenario:
        """A checked copy with top-level fields replaced (nested sections as dicts or models)."""
        return parse_scenario({**self.model_dump(), **changes})

    @model_validator(mode="after")
    def _unique_tenants(self) -> Scenario:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        return self


def parse_scenario(raw: dict) -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ConfigError(f"invalid scenario: {where}: {first['msg']}") from exc


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"scenario {path} must be a mapping")
    return parse_scenario(raw)
