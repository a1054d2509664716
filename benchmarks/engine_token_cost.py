"""Engine cost per token kind, for ``cost.engine_token_cost`` in the stack config.

Loads one model's engine in this process (the config's first model, or ``--model``), saturates
it with a batch of prefill-only requests and a batch of decode-heavy requests, and prints the
replica-seconds per prefill and per decode token, their ratio, and the USD per 1M tokens of each
kind on the model's accelerator (pricing catalog), next to each baseline API's input and output
prices. Paste the printed YAML into the config.

    .venv/bin/python benchmarks/engine_token_cost.py [--config deploy/local.yaml] [--concurrency 16]
        [--smoke]

``--smoke`` (the test suite's run): a few short requests per batch.
"""

from __future__ import annotations

import argparse
import asyncio

from moestack.config import load_config
from moestack.engine import build_engine
from moestack.metering.calibrate import measure_token_cost
from moestack.metering.cost import replica_usd_per_hour
from moestack.metering.pricing import load_pricing
from moestack.testing.benchmark_args import parse_with_smoke

SMOKE = {"prompt_tokens": 64, "decode_tokens": 16, "concurrency": 4}
"""``--smoke``: the smallest batches that still give both figures."""


async def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", help="stack config (default: the embedded local default)")
    ap.add_argument("--model", help="model name (default: the config's first model)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    args = parse_with_smoke(ap, argv, SMOKE)
    config = load_config(args.config)
    model = config.model(args.model) if args.model else config.models[0]
    catalog = load_pricing(config.pricing_file, config.cost.usd_per_gpu_hour)
    engine = build_engine(model, config.cache_dir)
    await engine.start()
    try:
        m = await measure_token_cost(engine, prompt_tokens=args.prompt_tokens,
                                     decode_tokens=args.decode_tokens,
                                     concurrency=args.concurrency)
    finally:
        engine.stop()
    usd_per_s = replica_usd_per_hour(model, catalog) / 3600
    print(f"model {model.name} ({model.engine}, {model.accelerator}"
          f"{' ' + model.gpu if model.gpu else ''}), "
          f"concurrency {args.concurrency}")
    print(f"prefill: {m.prefill_tokens} tokens in {m.prefill_wall_s:.3f} s -> "
          f"{m.prefill_s_per_token:.3e} replica-s/token ({1 / m.prefill_s_per_token:,.0f} tok/s)")
    print(f"decode:  {m.decode_tokens} tokens in {m.decode_wall_s:.3f} s -> "
          f"{m.decode_s_per_token:.3e} replica-s/token ({1 / m.decode_s_per_token:,.0f} tok/s)")
    print(f"decode / prefill cost ratio: {m.decode_s_per_token / m.prefill_s_per_token:.1f}x")
    p1m, d1m = m.prefill_s_per_token * usd_per_s * 1e6, m.decode_s_per_token * usd_per_s * 1e6
    print(f"\nat {usd_per_s * 3600:.3f} USD/replica-hour, fully utilised: "
          f"input {p1m:.4f} USD/1M, output {d1m:.4f} USD/1M")
    print(f"{'baseline':20} {'input USD/1M':>12} {'x self':>8} {'output USD/1M':>13} {'x self':>8}")
    for name, b in catalog.baselines.items():
        print(f"{name:20} {b.usd_per_1m_input_tokens:>12.4f} "
              f"{b.usd_per_1m_input_tokens / p1m:>8.1f} {b.usd_per_1m_output_tokens:>13.4f} "
              f"{b.usd_per_1m_output_tokens / d1m:>8.1f}")
    print(f"\ncost:\n  engine_token_cost:\n    {model.name}:\n"
          f"      prefill_s_per_token: {m.prefill_s_per_token:.3e}\n"
          f"      decode_s_per_token: {m.decode_s_per_token:.3e}")


if __name__ == "__main__":
    asyncio.run(main())
