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
the AVX2/native ratios. ``--cached`` takes the checkpoint from moestack's model cache
(``MOESTACK_CACHE_DIR``; built there first if missing) instead, and prints no build time.
``--report DIR`` also checks each path's kernels after its timed run and writes what it found
to ``DIR/<path>.json`` (tests/integration/test_tiny_v4_avx2.py asserts on it): the calls of
each ``_C`` op (counted from the start, which slows the timed run), three prompts generated
greedily with the top-2 log-probabilities, and two fixed token sequences scored with
``prompt_logprobs`` (one past 4 x ``index_topk`` compressed positions, so the sparse indexer's
kernels run). ``--smoke`` (the test suite's run): ``--cached``, one round of two short prompts,
no long prompt.
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
SMOKE = {"rounds": 1, "prompts": 2, "max_tokens": 8, "long_prompt": 0, "cached": True}
"""``--smoke``: the smallest run that still loads and times both paths (the checkpoint from the
suite's model cache: building it is timed by the full run, and tested elsewhere)."""

CHILD = r"""
import collections, json, sys, time
if __name__ == "__main__":
    import torch
    ckpt, prompts, max_tokens, long_prompt, check = sys.argv[1], *map(int, sys.argv[2:6])
    calls = collections.Counter()
    if check:  # every op call through torch.ops, from the engine's load on
        call = torch._ops.OpOverloadPacket.__call__
        def counting(op, *args, **kwargs):
            calls[op._qualified_op_name] += 1
            return call(op, *args, **kwargs)
        torch._ops.OpOverloadPacket.__call__ = counting
    from vllm import LLM, SamplingParams
    from moestack.vllm_cpu import v4_ops
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
    if check:
        greedy = llm.generate(["The planner places experts", "hello world", "tenant budget " * 12],
                              SamplingParams(max_tokens=12, temperature=0, logprobs=2,
                                             ignore_eos=True), use_tqdm=False)
        sequences = [[(i * 7919 + 13) % 1000 + 3 for i in range(2100)],
                     [(i * 31 + 7) % 997 + 3 for i in range(200)]]
        scored = llm.generate([{"prompt_token_ids": s} for s in sequences],
                              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                             prompt_logprobs=2), use_tqdm=False)
        rows = []  # per scored position: its token's logprob, the argmax, the top-2 logprobs
        for seq, out in zip(sequences, scored):
            for token, top in zip(seq[1:], out.prompt_logprobs[1:]):
                best = sorted(top.items(), key=lambda kv: -kv[1].logprob)
                rows.append([top[token].logprob, best[0][0], best[0][1].logprob,
                             best[1][1].logprob])
        margins = [[sorted((lp.logprob for lp in step.values()), reverse=True)[:2]
                    for step in o.outputs[0].logprobs] for o in greedy]
        print("REPORT " + json.dumps({
            "registered": list(v4_ops.registered()),
            "convert_weight_packed": hasattr(torch.ops._C, "convert_weight_packed"),
            "weight_packed_linear": hasattr(torch.ops._C, "weight_packed_linear"),
            "calls": {k.split("::")[1]: v for k, v in calls.items() if k.startswith("_C::")},
            "greedy": [list(o.outputs[0].token_ids) for o in greedy],
            "margins": [[top[0] - top[1] for top in steps] for steps in margins],
            "scored": rows}))
"""


def build(out: Path) -> Path:
    """``moestack model build-tiny`` in a fresh process, as a user runs it."""
    path = out / "deepseek-v4"
    subprocess.run([sys.executable, "-m", "moestack", "model", "build-tiny", "--arch",
                    "deepseek-v4", "--out", str(path)], check=True, capture_output=True)
    return path


def cached() -> Path:
    """The checkpoint from moestack's model cache (built there first if missing)."""
    from moestack.engine.tiny import TinySpec, ensure_tiny_model

    return ensure_tiny_model(TinySpec("deepseek-v4"))


def run(path_name: str, ckpt: Path, args) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (cpu_kernels.SWITCH_ENV, "ATEN_CPU_CAPABILITY")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=tempfile.mkdtemp(prefix="v4avx2."),
               **PATHS[path_name])
    check = int(args.report is not None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(args.prompts),
                          str(args.max_tokens), str(args.long_prompt), str(check)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{path_name} failed:\n{out.stderr[-4000:]}")
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()
             if line.startswith(("RESULT ", "REPORT "))}
    res = json.loads(lines["RESULT"])
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / f"{path_name}.json").write_text(lines["REPORT"])
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
    ap.add_argument("--cached", action="store_true",
                    help="the checkpoint from moestack's model cache, not a fresh timed build")
    ap.add_argument("--report", type=Path, metavar="DIR",
                    help="also check each path's kernels and write DIR/<path>.json "
                    "(slows the timed runs)")
    args = parse_with_smoke(ap, argv, SMOKE)
    paths = list(PATHS)
    if "avx512_bf16" not in cpu_kernels.cpu_flags():
        paths = ["avx2"]
        print("this CPU has no avx512_bf16: the native path cannot run here; AVX2 path only")
    t0 = time.perf_counter()
    if args.cached:
        ckpt = cached()
        print(f"cached deepseek-v4: {ckpt}", flush=True)
    else:
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
