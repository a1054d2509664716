"""Tiny DeepSeek-V4 on vLLM's AVX2 kernels (moestack's torch kernels) against the native ones.

    python benchmarks/tiny_v4_avx2.py [--rounds 3] [--prompts 16] [--max-tokens 64]
                                      [--long-prompt 2100] [--smoke]

The AVX2 path is what a host without AVX512-BF16 runs: ``MOESTACK_VLLM_CPU_KERNELS=avx2``
(with ``ATEN_CPU_CAPABILITY=avx2``) makes vLLM load ``_C_AVX2``, and moestack's CPU shim
supplies torch versions of the 16 DeepSeek-V4 kernels it lacks. The native path loads ``_C``
(needs AVX512 with BF16 here). Builds the tiny V4 once (``moestack model build-tiny``), then
runs each path in a fresh process per round, the two alternating (the first of a round swaps
every round), with the same engine settings (offline ``LLM``, in-process engine, eager,
max_model_len 4096, both cores) and the same prompts: load time; greedy generation of
``--prompts`` x ``--max-tokens`` tokens (EOS ignored) after a warm-up; and the prefill of one
``--long-prompt``-token prompt (past 2048 tokens the sparse indexer's kernels run).
Prints per path the load time, generated tokens/s and prefill tokens/s (median over rounds) and
the AVX2/native ratios. ``--smoke`` (the test suite's run): one round of two short prompts, no
long prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moestack.testing.benchmark_args import parse_with_smoke
from moestack.vllm_cpu import libraries as cpu_kernels

PATHS = {"native": {}, "avx2": {cpu_kernels.SWITCH_ENV: "avx2", "ATEN_CPU_CAPABILITY": "avx2"}}
SMOKE = {"rounds": 1, "prompts": 2, "max_tokens": 8, "long_prompt": 0}
"""``--smoke``: the smallest run that still loads and times both paths."""

CHILD = r"""
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    import torch
    from moestack.vllm_cpu import v4_ops
    ckpt, prompts, max_tokens, long_prompt = sys.argv[1], *map(int, sys.argv[2:5])
    t0 = time.perf_counter()
    llm = LLM(model=ckpt, enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096,
              distributed_executor_backend="uni")
    load_s = time.perf_counter() - t0
    llm.generate(["warm up"], SamplingParams(max_tokens=4))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([f"Request {i}: the planner places experts" for i in range(prompts)],
                        params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    prefill_s = None
    if long_prompt:
        ids = [(i * 7919 + 13) % 1000 + 3 for i in range(long_prompt)]
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1), use_tqdm=False)
        prefill_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "load_s": load_s, "gen_s": gen_s, "prefill_s": prefill_s,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "torch_kernels": len(v4_ops.registered()),
        "avx512_bf16_library": hasattr(torch.ops._C, "weight_packed_linear")}))
"""


def build(out: Path) -> Path:
    """``moestack model build-tiny`` in a fresh process, as a user runs it."""
    path = out / "deepseek-v4"
    subprocess.run([sys.executable, "-m", "moestack", "model", "build-tiny", "--arch",
                    "deepseek-v4", "--out", str(path)], check=True, capture_output=True)
    return path


def run(path_name: str, ckpt: Path, args) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (cpu_kernels.SWITCH_ENV, "ATEN_CPU_CAPABILITY")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=tempfile.mkdtemp(prefix="v4avx2."),
               **PATHS[path_name])
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(args.prompts),
                          str(args.max_tokens), str(args.long_prompt)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{path_name} failed:\n{out.stderr[-4000:]}")
    res = json.loads(next(line for line in out.stdout.splitlines()
                          if line.startswith("RESULT ")).removeprefix("RESULT "))
    expected = (0, True) if path_name == "native" else (16, False)
    if (res["torch_kernels"], res["avx512_bf16_library"]) != expected:
        sys.exit(f"{path_name}: ran on the wrong kernels ({res})")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--long-prompt", type=int, default=2100,
                    help="tokens of the prefill-only prompt (0: none)")
    args = parse_with_smoke(ap, argv, SMOKE)
    paths = list(PATHS)
    if "avx512_bf16" not in cpu_kernels.cpu_flags():
        paths = ["avx2"]
        print("this CPU has no avx512_bf16: the native path cannot run here; AVX2 path only")
    t0 = time.perf_counter()
    ckpt = build(Path(tempfile.mkdtemp(prefix="v4avx2-model.")))
    print(f"built deepseek-v4: {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(args.rounds):
        for name in paths if r % 2 == 0 else paths[::-1]:
            res = run(name, ckpt, args)
            runs[name].append(res)
            prefill = (f", prefill {args.long_prompt / res['prefill_s']:.0f} tokens/s"
                       if res["prefill_s"] else "")
            print(f"round {r + 1}/{args.rounds} {name}: load {res['load_s']:.1f} s, "
                  f"{res['tokens'] / res['gen_s']:.0f} tokens/s{prefill}", flush=True)
    rate = {p: statistics.median(x["tokens"] / x["gen_s"] for x in runs[p]) for p in paths}
    prefill = {p: statistics.median(args.long_prompt / x["prefill_s"] for x in runs[p])
               for p in paths if args.long_prompt}
    print(f"\n{'path':<7} {'kernels':<34} {'load s':>7} {'tokens/s':>9} {'prefill/s':>10}")
    for name in paths:
        kernels = ("_C (native)" if name == "native"
                   else "_C_AVX2 + 16 moestack torch kernels")
        load = statistics.median(x["load_s"] for x in runs[name])
        pre = f"{prefill[name]:10.0f}" if name in prefill else f"{'-':>10}"
        print(f"{name:<7} {kernels:<34} {load:7.1f} {rate[name]:9.0f} {pre}")
    sizes = (f"{args.prompts} prompts x {args.max_tokens} tokens, median of {args.rounds} "
             f"rounds")
    if "native" in rate:
        line = f"\nAVX2/native tokens/s {rate['avx2'] / rate['native']:.2f}"
        if prefill:
            ratio = prefill["avx2"] / prefill["native"]
            line += f", prefill of {args.long_prompt} tokens {ratio:.2f}"
        print(f"{line}; {sizes}")
    else:
        print(f"\nAVX2 path only; {sizes}")


if __name__ == "__main__":
    main()
