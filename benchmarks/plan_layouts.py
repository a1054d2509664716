"""Print the planner's figures for catalog models on each GPU kind, side by side.

    python benchmarks/plan_layouts.py [--context 32k] [--usd-per-gpu-hour 3] [--smoke]

For each (model, GPU, GPUs) it prints the chosen layout, weights and KV cache per GPU, KV
capacity, the decode roofline (single stream and batch ceiling), USD per 1M output tokens at the
ceiling (pricing catalog unless overridden), the ceiling relative to the first row of the
same model, and the output price of the model's own API where the catalog has one (the
DeepSeek API for DeepSeek-V4). All figures are model outputs, not measurements.
``--smoke`` (the test suite's run) plans the first model of each family only.
"""

from __future__ import annotations

import argparse

from moestack.cli.plan import parse_tokens
from moestack.parallel import GPUS, SHAPES, PlanRequest, plan
from moestack.cli.plan import baseline_quote, gpu_price

CASES = [
    ("deepseek-v4-flash", [("h100", 8), ("h200", 8), ("b200", 8)]),
    ("deepseek-v4-pro", [("h100", 8), ("h100", 16), ("h200", 8), ("b200", 8)]),
    ("deepseek-v3", [("h100", 8), ("h100", 16), ("h200", 8), ("b200", 8)]),
    ("kimi-k2", [("h200", 8), ("h200", 16), ("b200", 8)]),
    ("qwen3-235b-a22b", [("h100", 4), ("h100", 8), ("h200", 4)]),
    ("mixtral-8x22b", [("a100", 4), ("h100", 4), ("h100", 8)]),
    ("mixtral-8x7b", [("l40s", 4), ("a100", 2), ("h100", 2)]),
    ("qwen3-30b-a3b", [("l40s", 2), ("a100", 1), ("h100", 1), ("h200", 1)]),
]


def smoke_cases() -> list[tuple[str, list[tuple[str, int]]]]:
    """One model per family (the first of each name prefix), with all its setups."""
    seen: set[str] = set()
    out = []
    for model, setups in CASES:
        family = model.split("-")[0]
        if family not in seen:
            seen.add(family)
            out.append((model, setups))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=parse_tokens, default=32768)
    ap.add_argument("--usd-per-gpu-hour", type=float)
    ap.add_argument("--smoke", action="store_true", help="one model per family (the test "
                    "suite's run)")
    args = ap.parse_args(argv)
    head = (f"{'model':17} {'gpus':>8} {'layout':24} {'fits':4} {'w GiB':>6} {'kv GiB':>6} "
            f"{'kv tokens':>11} {'1-stream':>8} {'ceiling':>8} {'x first':>7} {'$/1M out':>8} "
            f"{'API out':>7}")
    print(f"context {args.context} tokens\n{head}\n{'-' * len(head)}")
    for model, setups in smoke_cases() if args.smoke else CASES:
        first = None
        for gpu, n in setups:
            g = GPUS[gpu]
            p = plan(PlanRequest(SHAPES[model], g, n, context_tokens=args.context,
                                 usd_per_gpu_hour=gpu_price(g.accelerator_type,
                                                            override=args.usd_per_gpu_hour)))
            first = first or p.decode_ceiling_tokens_per_s or None
            ratio = p.decode_ceiling_tokens_per_s / first if first else 0.0
            usd = p.usd_per_1m_output_tokens if p.fits else None
            api = baseline_quote(p.shape)
            print(f"{model:17} {n:>3} {gpu:4} {p.layout.describe():24} "
                  f"{'yes' if p.fits else 'NO':4} {p.weight_gib_per_gpu:6.1f} "
                  f"{p.kv_cache_gib_per_gpu:6.1f} {p.kv_capacity_tokens:11,} "
                  f"{p.single_stream_tokens_per_s:8.0f} {p.decode_ceiling_tokens_per_s:8.0f} "
                  f"{ratio:7.2f} {f'{usd:8.3f}' if usd else '       -'} "
                  f"{f'{api.usd_per_1m_output_tokens:7.2f}' if api else '      -'}")


if __name__ == "__main__":
    main()
