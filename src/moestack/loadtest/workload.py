"""Turn a :class:`Scenario` into a deterministic list of requests with their start times.

The same scenario and seed always give the same requests, so two runs (e.g. straight to vLLM and
through moestack) send exactly the same load. Prompts are made of common English words, about one
token each for BPE tokenizers (exactly one for the fake engine); the server's ``usage`` gives the
real counts used in reports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from moestack.loadtest.scenario import ArrivalConfig, LengthDistribution, Scenario

_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good "
    "me give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well "
    "also play small end put home read hand port large spell add even land here must big high"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request of a run: when it starts (seconds after the run starts), who sends what."""

    index: int
    start_s: float
    tenant: str
    prompt: str
    prompt_words: int
    max_tokens: int
    prefix_id: int | None = None


def sample_length(dist: LengthDistribution, rng: random.Random) -> int:
    if dist.kind == "fixed":
        value = dist.mean
    elif dist.kind == "uniform":
        value = rng.uniform(dist.min, dist.max)
    elif dist.kind == "normal":
        value = rng.gauss(dist.mean, dist.stddev)
    else:  # lognormal with the given mean and stddev of the value itself
        import math

        var = dist.stddev ** 2
        sigma2 = math.log1p(var / dist.mean ** 2)
        mu = math.log(dist.mean) - sigma2 / 2
        value = rng.lognormvariate(mu, math.sqrt(sigma2))
    return int(min(dist.max, max(dist.min, round(value))))


def arrival_times(arrival: ArrivalConfig, n: int, rng: random.Random) -> list[float]:
    """Start offsets in seconds: ``n`` values, non-decreasing, the first at 0."""
    if arrival.rate_rps is None:
        return [0.0] * n
    mean_gap = 1.0 / arrival.rate_rps
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        if arrival.process == "constant":
            gap = mean_gap
        elif arrival.process == "poisson":
            gap = rng.expovariate(arrival.rate_rps)
        else:  # gamma gaps with the same mean: shape k = 1/cv^2, scale = mean/k
            k = 1.0 / arrival.burstiness_cv ** 2
            gap = rng.gammavariate(k, mean_gap / k)
        t += gap
    return times


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(n)]


def build_workload(scenario: Scenario, count: int | None = None, seed_offset: int = 0
                   ) -> list[RequestSpec]:
    """The requests of ``scenario`` (``count`` overrides ``num_requests``, e.g. for warm-up)."""
    rng = random.Random(scenario.seed + seed_offset)
    n = scenario.num_requests if count is None else count
    sp = scenario.shared_prefix
    prefix_rng = random.Random(scenario.seed ^ 0x5EED)
    prefixes = [_words(prefix_rng, sp.prefix_tokens) for _ in range(sp.num_prefixes)]
    tenants = scenario.tenants
    shares = [t.share for t in tenants]
    starts = arrival_times(scenario.arrival, n, rng)
    specs = []
    for i, start in enumerate(starts):
        tenant = rng.choices(tenants, weights=shares)[0]
        prompt_len = sample_length(tenant.prompt_tokens or scenario.prompt_tokens, rng)
        max_tokens = sample_length(tenant.output_tokens or scenario.output_tokens, rng)
        prefix_id = None
        words: list[str] = []
        if sp.prefix_tokens and rng.random() < sp.fraction:
            prefix_id = rng.randrange(sp.num_prefixes)
            words = list(prefixes[prefix_id])
        # A word unique to the request right after the (optional) prefix: requests share cached
        # blocks only through the configured prefix.
        unique = [f"r{i}"] + _words(rng, max(0, prompt_len - len(words) - 1))
        words = words + unique
        specs.append(RequestSpec(index=i, start_s=start, tenant=tenant.name,
                                 prompt=" ".join(words), prompt_words=len(words),
                                 max_tokens=max_tokens, prefix_id=prefix_id))
    return specs
