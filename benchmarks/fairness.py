"""Fairness of the tenancy layer's VTC queue vs FIFO, through the gateway on the fake engine.

Prints, side by side from one run:
1. both tenants backlogged with weights 1 and 3: each tenant's share of served tokens vs its
   weight share, and Jain's fairness index of share/weight (1.0 = exactly by weight);
2. a light tenant (one request at a time) alone, then next to a heavy tenant sending 10x its
   load: the light tenant's p50/p95 time to first token (queueing included, from the usage
   ledger), with the VTC queue and with a FIFO queue.

    .venv/bin/python benchmarks/fairness.py [--seconds 8] [--max-inflight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile

from moestack.loadtest import jain_index
from moestack.tenancy import query_usage
from moestack.tenancy.fair import FairQueue
from moestack.tenancy.models import utcnow
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

MODEL = "fake-moe"


class FifoQueue(FairQueue):
    """One queue for everybody, in arrival order: what a gateway without fair scheduling does."""

    async def acquire(self, tenant, weight, priority, cost_tokens):
        return await super().acquire("all", 1.0, 0, cost_tokens)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else float("nan")


async def load(stack, workers: dict[str, int], seconds: float, max_tokens: int,
               window: list | None = None) -> None:
    """Closed-loop workers per tenant for ``seconds``; ``window`` receives the UTC times between
    which every tenant was backlogged (after a ramp-up of a fifth of the phase, before stop)."""
    stop = asyncio.Event()

    async def loop(key):
        client = stack.openai(key)
        while not stop.is_set():
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}],
                max_tokens=max_tokens)

    tasks = [asyncio.create_task(loop(stack.keys[t])) for t, n in workers.items()
             for _ in range(n)]
    await asyncio.sleep(seconds / 5)
    begin = utcnow()
    await asyncio.sleep(seconds * 4 / 5)
    if window is not None:
        window[:] = [begin, utcnow()]
    stop.set()
    await asyncio.gather(*tasks)


async def scenario(args, weights: dict[str, float], queue_cls, run):
    with tempfile.TemporaryDirectory() as tmp:
        config = fake_config(
            fake_model(MODEL, fake={"ttft_s": args.ttft_s, "token_interval_s": args.itl_s}),
            storage={"url": f"sqlite:///{tmp}/bench.db"},
            tenancy={"enabled": True,
                     "fair_queue": {"max_inflight_requests_per_model": args.max_inflight}})
        async with local_stack(config) as stack:
            stack.tenancy._queues[MODEL] = queue_cls(args.max_inflight)
            stack.keys = {t: stack.tenancy.store.create_tenant(t, weight=w)[1].plaintext
                          for t, w in weights.items()}
            return await run(stack)


def since_mark(stack, tenant, skip):
    return query_usage(stack.tenancy.store, tenant=tenant)[skip:]


async def shares(args, queue_cls):
    weights = {"a": 1.0, "b": 3.0}

    async def run(stack):
        window: list = []
        await load(stack, {"a": args.backlog, "b": args.backlog}, args.seconds, args.max_tokens,
                   window)
        # Tokens of requests that finished while both tenants were backlogged (not the ramp-up,
        # not the drain after the load stopped).
        return {t: sum(r.prompt_tokens + r.completion_tokens for r in since_mark(stack, t, 0)
                       if window[0] <= r.finished_at <= window[1]) for t in weights}

    tokens = await scenario(args, weights, queue_cls, run)
    total, wsum = sum(tokens.values()), sum(weights.values())
    return {t: (tokens[t] / total, weights[t] / wsum) for t in weights}


async def light_vs_heavy(args, queue_cls):
    async def run(stack):
        await load(stack, {"light": 1}, 0.3, args.max_tokens)  # warm-up
        warm = len(since_mark(stack, "light", 0))
        await load(stack, {"light": 1}, args.seconds, args.max_tokens)
        alone = [r.ttft_s for r in since_mark(stack, "light", warm)]
        await load(stack, {"light": 1, "heavy": 10}, args.seconds, args.max_tokens)
        both = [r.ttft_s for r in since_mark(stack, "light", warm + len(alone))]
        heavy = len(since_mark(stack, "heavy", 0))
        return alone, both, heavy

    return await scenario(args, {"light": 1.0, "heavy": 1.0}, queue_cls, run)


async def main(args) -> None:
    request_s = args.ttft_s + (args.max_tokens - 1) * args.itl_s
    print(f"fake engine: TTFT {args.ttft_s * 1e3:.0f} ms, {args.max_tokens} tokens, one request "
          f"~{request_s * 1e3:.0f} ms; {args.max_inflight} dispatch slots; {args.seconds:g} s "
          "per phase\n")
    print("1. both backlogged, weights a=1, b=3 (share of served tokens)")
    print(f"   {'queue':6} {'tenant':6} {'weight share':>12} {'token share':>12} "
          f"{'share/weight':>12}")
    for name, cls in (("vtc", FairQueue), ("fifo", FifoQueue)):
        res = await shares(args, cls)
        for t, (share, wshare) in res.items():
            print(f"   {name:6} {t:6} {wshare:>12.3f} {share:>12.3f} {share / wshare:>12.3f}")
        print(f"   {name:6} Jain's index of share/weight: "
              f"{jain_index([s / w for s, w in res.values()]):.4f}")
    print("\n2. light tenant (1 request at a time) alone vs next to heavy (10x the load)")
    print(f"   {'queue':6} {'alone p50':>10} {'alone p95':>10} {'contended p50':>14} "
          f"{'contended p95':>14} {'p95 ratio':>9} {'light n':>8} {'heavy n':>8}")
    for name, cls in (("vtc", FairQueue), ("fifo", FifoQueue)):
        alone, both, heavy = await light_vs_heavy(args, cls)
        print(f"   {name:6} {pct(alone, .5) * 1e3:>8.1f}ms {pct(alone, .95) * 1e3:>8.1f}ms "
              f"{pct(both, .5) * 1e3:>12.1f}ms {pct(both, .95) * 1e3:>12.1f}ms "
              f"{pct(both, .95) / pct(alone, .95):>9.2f} {len(both):>8} {heavy:>8}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each load phase")
    p.add_argument("--max-inflight", type=int, default=4, help="dispatch slots of the model")
    p.add_argument("--backlog", type=int, default=16, help="workers per tenant in part 1")
    p.add_argument("--max-tokens", type=int, default=8, help="completion tokens per request")
    p.add_argument("--ttft-s", type=float, default=0.05, help="fake engine time to first token")
    p.add_argument("--itl-s", type=float, default=0.02, help="fake engine inter-token time")
    asyncio.run(main(p.parse_args()))
