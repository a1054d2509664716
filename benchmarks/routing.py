"""A/B test of replica routing policies on the same load: time to first token and throughput.

Runs every policy on identical, seeded request schedules against in-process fake-engine replicas
whose prefill time depends on prefix-cache hits (one prefill at a time per replica) and whose
decode takes a fixed time per token, then prints one table per workload with ratios against
``least_outstanding_tokens``. Cache-aware routing wins on shared prefixes and can lose when one
prefix is hot; the load guard is what keeps that loss small.

    python benchmarks/routing.py [--replicas 4] [--requests 200] [--rate 30] [--smoke]

``--smoke`` (the test suite's run): every workload and policy with a few short requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

from moestack.config.schema import ModelConfig, RoutingConfig
from moestack.engine import build_engine
from moestack.routing import Router
from moestack.routing.replica_set import ReplicaSet
from moestack.testing.requests import engine_request
from moestack.testing.benchmark_args import parse_with_smoke

POLICIES = [
    ("random", {}),
    ("least_outstanding_tokens", {}),
    ("prefix_affinity", {}),
    ("prefix_affinity (no load guard)", {"policy": "prefix_affinity",
                                         "load_guard_tokens": 10**9}),
    ("tenant_prefix_affinity", {}),
]
BASELINE = "least_outstanding_tokens"
SMOKE = {"replicas": 2, "requests": 8, "rate": 200.0, "max_tokens": 4}
"""``--smoke``: the smallest run of every workload and policy."""


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt: str
    tenant: str


def workload(name: str, n: int, rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals; prompts = a family's shared prefix (400 words) + a unique question."""
    rng = random.Random(seed)
    families = {"shared-prefixes": 12, "hot-prefix": 12, "unique-prompts": 0}[name]
    prefixes = [" ".join(f"f{f}w{i}" for i in range(400)) for f in range(families)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        if not families:
            prompt = " ".join(f"u{i}w{k}" for k in range(400))
            family = i % 6
        else:
            family = 0 if name == "hot-prefix" and rng.random() < 0.7 else rng.randrange(families)
            prompt = prefixes[family] + " " + " ".join(f"q{i}w{k}" for k in range(20))
        out.append(Arrival(t, prompt, tenant=f"tenant{family % 6}"))
    return out


async def run_policy(label: str, routing: dict, arrivals: list[Arrival], replicas: int,
                     max_tokens: int) -> dict[str, float]:
    policy = routing.get("policy", label)
    model = ModelConfig.model_validate({
        "name": "bench", "engine": "fake", "max_model_len": 4096,
        "fake": {"prefill_s_per_token": 0.0004, "token_interval_s": 0.004,
                 "token_interval_per_running_request_s": 0.0005,
                 "prefix_cache_tokens": 20_000, "prefix_block_tokens": 16}})
    engines = {f"r{i}": build_engine(model) for i in range(replicas)}
    for e in engines.values():
        await e.start()
    config = RoutingConfig(**{**routing, "policy": policy})
    replica_set = ReplicaSet(engines, Router(config, seed=7))
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int, a: Arrival) -> None:
        nonlocal tokens
        await asyncio.sleep(max(0.0, a.at_s - (time.monotonic() - start)))
        sent = time.monotonic()
        request = engine_request({"model": model.name, "prompt": a.prompt,
                                  "max_tokens": max_tokens, "stream": True},
                                 request_id=f"b{i}", max_model_len=model.max_model_len)
        first = True
        async for chunk in replica_set.serve(request, a.tenant):
            if first:
                ttfts.append(time.monotonic() - sent)
                first = False
            last = chunk
        tokens += last.usage.completion_tokens

    start = time.monotonic()
    await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
    elapsed = time.monotonic() - start
    caches = [e.prefix_cache for e in engines.values()]
    per_replica = [len(e.requests_seen) for e in engines.values()]
    return {"ttft_mean_s": statistics.fmean(ttfts),
            "ttft_p90_s": statistics.quantiles(ttfts, n=10)[-1],
            "tokens_per_s": tokens / elapsed,
            "cache_hit_ratio": sum(c.hit_tokens for c in caches) / sum(c.queried_tokens
                                                                       for c in caches),
            "max_replica_share": max(per_replica) / sum(per_replica)}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=30.0, help="arrivals per second")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_with_smoke(parser, argv, SMOKE)
    print(f"{args.replicas} fake replicas, {args.requests} requests at {args.rate:g}/s, "
          f"{args.max_tokens} tokens each; prefill 0.4 ms per uncached token (serial per "
          "replica), decode 4 ms per token + 0.5 ms per running request")
    for name in ("shared-prefixes", "hot-prefix", "unique-prompts"):
        arrivals = workload(name, args.requests, args.rate, args.seed)
        rows = {label: await run_policy(label, routing, arrivals, args.replicas, args.max_tokens)
                for label, routing in POLICIES}
        base = rows[BASELINE]
        print(f"\nworkload: {name}")
        print(f"{'policy':34} {'TTFT mean s':>11} {'p90 s':>7} {'x base':>7} {'tok/s':>8} "
              f"{'x base':>7} {'cache hit':>9} {'max share':>9}")
        for label, r in rows.items():
            print(f"{label:34} {r['ttft_mean_s']:11.3f} {r['ttft_p90_s']:7.3f} "
                  f"{r['ttft_mean_s'] / base['ttft_mean_s']:7.2f} {r['tokens_per_s']:8.0f} "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f} "
                  f"{r['cache_hit_ratio']:9.2f} {r['max_replica_share']:9.2f}")


if __name__ == "__main__":
    asyncio.run(main())
