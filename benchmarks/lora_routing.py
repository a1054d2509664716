"""LoRA adapter affinity routing against today's routing: adapter loads, TTFT and throughput.

Two replicas of one model with ``max_loras`` 2 serve the same seeded Poisson stream of requests
naming ``--adapters`` adapters with Zipf-distributed popularity (the k-th most popular asked
with weight 1/k^s). Each replica keeps ``max_cpu_loras`` adapters loaded (least recently used
out; a request for another one loads it): first vLLM's default, ``max_cpu_loras`` =
``max_loras``, then each value of ``--max-cpu-loras`` (vLLM's CPU cache of adapters, usually set
larger than the GPU slots). For each, the stream runs twice in one process: the default policy
(least outstanding tokens) with ``routing.adapter_affinity`` on, then off (today's routing).
Replicas report the adapters they hold every 2 s, as ModelServer replicas do through Ray Serve.

With 2 slots per replica and 8 adapters no routing can keep loads near zero: the 4 slots of the
two replicas hold at most 4 adapters, and each request for one of the others loads it and evicts
one. At Zipf s=1 about a third of the requests name an adapter outside the top 3; so even an
oracle that pinned the top 3 and kept one slot for the rest loads about 260 times per 1000
requests, against about 600 for load-balanced routing: at most about 2.3x fewer.

The replicas are in-process fake engines (:mod:`moestack.testing.fake_engine`) with a load cost:
an adapter load takes ``--load-s`` (default 0.2 s: reading and installing a rank-16 adapter of
a 7-8B model, ~40-80 MB) during which the replica's prefills wait, as vLLM's engine step waits
for ``add_lora``; prefill 0.4 ms per prompt token (one at a time per replica), decode 4 ms per
token plus 0.5 ms per running request. ``--engine vllm`` runs real vLLM replicas instead (two
in-process engines of the tiny dense Llama, LoRA on, ``--adapters`` random rank-8 PEFT adapters
built for it): real loads, counted when ``ensure_adapter`` loaded (vLLM's own reloads of an
adapter evicted mid-batch are not seen); a tiny adapter loads in milliseconds, so the TTFT gap is
small there. Printed: adapter loads per 1000 requests, TTFT p50/p95, throughput, and the ratios
off/on; a PNG plots the loads and TTFT percentiles.

    .venv/bin/python benchmarks/lora_routing.py [--requests 1000] [--rate 8] [--zipf-s 1.0]
        [--max-loras 2] [--max-cpu-loras 4] [--adapters 8] [--out DIR] [--smoke]

``--smoke`` (the test suite's run): both variants with a few short requests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moestack.config.schema import ModelConfig, RoutingConfig
from moestack.engine import build_engine
from moestack.engine.protocol import AdapterRef
from moestack.routing import Router
from moestack.routing.adapters import REPORT_PERIOD_S, adapter_slots
from moestack.routing.replica_set import ReplicaSet
from moestack.testing.benchmark_args import parse_with_smoke
from moestack.testing.requests import engine_request

MODEL = "bench-dense"
SMOKE = {"requests": 12, "rate": 100.0, "max_tokens": 4, "load_s": 0.01}
"""``--smoke``: both variants, a few short requests."""
VARIANTS = (("affinity", True), ("no-affinity", False))


@dataclass(frozen=True)
class Arrival:
    at_s: float
    adapter: str
    prompt: str


@dataclass
class Result:
    name: str
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0
    loads: int = 0
    per_replica: list[int] = field(default_factory=list)

    def pct(self, q: int) -> float:
        return statistics.quantiles(self.ttft_s, n=100, method="inclusive")[q - 1]

    def loads_per_1000(self) -> float:
        return 1000 * self.loads / len(self.ttft_s)


def arrivals(n: int, rate: float, adapters: int, zipf_s: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    names = [f"tenant{k}-lora" for k in range(adapters)]
    weights = [1 / (k + 1) ** zipf_s for k in range(adapters)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = " ".join(f"w{rng.randrange(5000)}" for _ in range(100))
        out.append(Arrival(t, rng.choices(names, weights)[0], prompt))
    return out


def model_config(args, cpu_loras: int) -> ModelConfig:
    if args.engine == "vllm":
        return ModelConfig.model_validate({
            "name": MODEL, "tiny": {"arch": "llama", "seed": 0},
            "architecture": "LlamaForCausalLM", "max_model_len": 512,
            "engine_args": {"enforce_eager": True, "enable_lora": True, "max_lora_rank": 8,
                            "max_loras": args.max_loras, "max_cpu_loras": cpu_loras}})
    return ModelConfig.model_validate({
        "name": MODEL, "engine": "fake", "max_model_len": 4096,
        "engine_args": {"enable_lora": True, "max_loras": args.max_loras,
                        "max_cpu_loras": cpu_loras},
        "fake": {"prefill_s_per_token": 0.0004, "token_interval_s": 0.004,
                 "token_interval_per_running_request_s": 0.0005,
                 "adapter_load_s": args.load_s}})


def adapter_paths(args) -> dict[str, str]:
    """Adapter name -> directory: built for the tiny Llama (vLLM), or nominal (fake)."""
    names = [f"tenant{k}-lora" for k in range(args.adapters)]
    if args.engine != "vllm":
        return {n: f"/adapters/{n}" for n in names}
    from moestack.adapters import AdapterSpec, build_adapter
    from moestack.engine.tiny import TinySpec, ensure_tiny_model

    base = ensure_tiny_model(TinySpec("llama"))
    return {n: str(build_adapter(base, args.out / "adapters" / n, AdapterSpec(seed=k + 1)))
            for k, n in enumerate(names)}


async def started(model: ModelConfig, replicas: int) -> dict:
    engines = {f"r{i}": build_engine(model) for i in range(replicas)}
    for e in engines.values():
        await e.start()
    return engines


async def run(name: str, affinity: bool, stream: list[Arrival], args, cpu_loras: int,
              engines: dict, paths: dict[str, str]) -> Result:
    model = model_config(args, cpu_loras)
    for e in engines.values():  # every variant starts with no adapter loaded
        for adapter in paths:
            await e.remove_adapter(adapter)
    fake_loads_before = sum(getattr(e, "adapter_loads", 0) for e in engines.values())
    router = Router(RoutingConfig(adapter_affinity=affinity), seed=args.seed,
                    adapter_slots=adapter_slots(model.lora_engine_args()))
    replicas = ReplicaSet(engines, router, report_interval_s=REPORT_PERIOD_S)
    result = Result(f"{name}" if cpu_loras == args.max_loras else f"{name} cpu{cpu_loras}")

    async def one(i: int, a: Arrival) -> None:
        await asyncio.sleep(max(0.0, a.at_s - (time.monotonic() - start)))
        request = engine_request({"model": a.adapter, "prompt": a.prompt, "temperature": 0,
                                  "max_tokens": args.max_tokens, "ignore_eos": True,
                                  "stream": True, "stream_options": {"include_usage": True}},
                                 request_id=f"{name}-{i}", max_model_len=model.max_model_len)
        request = dataclasses.replace(request, adapter=AdapterRef(a.adapter, paths[a.adapter]))
        sent, first, last = time.monotonic(), True, None
        async for chunk in replicas.serve(request):
            if first:
                result.ttft_s.append(time.monotonic() - sent)
                first = False
            last = chunk
        result.tokens += last.usage.completion_tokens

    start = time.monotonic()
    await asyncio.gather(*(one(i, a) for i, a in enumerate(stream)))
    result.elapsed_s = time.monotonic() - start
    result.loads = sum(a.total_loads for a in replicas.adapters.values())
    if args.engine == "fake":  # the fake also counts reloads of adapters evicted mid-batch
        result.loads = sum(e.adapter_loads for e in engines.values()) - fake_loads_before
    result.per_replica = [sum(rid == r for r in replicas.routed_to.values()) for rid in engines]
    return result


def plot(results: list[Result], path: Path) -> Path:
    from moestack.plotting import pyplot, save_figure

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4))
    names = [r.name.replace(" ", "\n") for r in results]
    left.bar(names, [r.loads_per_1000() for r in results],
             color=["tab:green", "tab:gray"] * (len(results) // 2))
    left.set_ylabel("adapter loads per 1000 requests")
    width = 0.35
    for k, (q, offset) in enumerate(((50, -width / 2), (95, width / 2))):
        right.bar([i + offset for i in range(len(results))],
                  [r.pct(q) * 1e3 for r in results], width, label=f"TTFT p{q}")
    right.set_xticks(range(len(results)), names)
    right.set_ylabel("ms")
    right.legend()
    return save_figure(fig, path)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("fake", "vllm"), default="fake")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=8.0, help="arrivals per second")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-cpu-loras", type=int, nargs="*", default=[4],
                        help="further runs with this many adapters held per replica")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load-s", type=float, default=0.2, help="seconds per adapter load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "moestack-bench")
    args = parse_with_smoke(parser, argv, SMOKE)
    print(f"{args.replicas} {args.engine} replicas, max_loras {args.max_loras}; "
          f"{args.adapters} adapters, Zipf s={args.zipf_s:g}; {args.requests} requests at {args.rate:g}/s, 100-token "
          f"prompts, {args.max_tokens} tokens each; adapter load "
          + (f"{args.load_s * 1e3:.0f} ms" if args.engine == "fake" else "vLLM's own"))
    stream = arrivals(args.requests, args.rate, args.adapters, args.zipf_s, args.seed)
    paths = adapter_paths(args)
    results = []
    for cpu_loras in (args.max_loras, *args.max_cpu_loras):
        engines = await started(model_config(args, cpu_loras), args.replicas)
        try:
            on, off = [await run(name, affinity, stream, args, cpu_loras, engines, paths)
                       for name, affinity in VARIANTS]
        finally:
            for e in engines.values():
                e.stop()
        results += [on, off]
        print(f"\nmax_cpu_loras {cpu_loras} (adapters held per replica)")
        print(f"{'routing':<20} {'loads/1000 req':>14} {'TTFT p50 ms':>11} {'p95 ms':>8} "
              f"{'req/s':>7} {'tok/s':>7} {'per replica':>12}")
        for r in (on, off):
            print(f"{r.name:<20} {r.loads_per_1000():14.1f} {r.pct(50) * 1e3:11.1f} "
                  f"{r.pct(95) * 1e3:8.1f} {len(r.ttft_s) / r.elapsed_s:7.2f} "
                  f"{r.tokens / r.elapsed_s:7.1f} {'/'.join(map(str, r.per_replica)):>12}")
        print(f"no-affinity / affinity: loads {off.loads / max(on.loads, 1):.2f}x, TTFT p50 "
              f"{off.pct(50) / on.pct(50):.2f}x, p95 {off.pct(95) / on.pct(95):.2f}x; throughput "
              f"affinity / no-affinity "
              f"{on.tokens / on.elapsed_s / (off.tokens / off.elapsed_s):.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"plot: {plot(results, args.out / 'lora_routing.png')}")


if __name__ == "__main__":
    asyncio.run(main())
