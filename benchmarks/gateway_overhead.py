"""Gateway overhead: the same load straight to vLLM's OpenAI server and through moestack.

Both targets serve the same tiny random-weight DeepSeek-V3-shaped checkpoint on CPU with the same
engine settings; the load (loadtest/scenarios/gateway-overhead.yaml: Poisson arrivals, streamed
chat) is identical request for request:

1. vLLM: ``python -m vllm.entrypoints.openai.api_server`` on the checkpoint;
2. moestack: ``moestack up`` with a config on the same checkpoint (Ray Serve HTTP proxy ->
   Gateway deployment -> ModelServer deployment hosting vLLM's serving layer over its
   AsyncLLM), with tenancy on as users run it (API key, limits, budget reservation, fair queue,
   ledger row per request);
3. with ``--ingress direct`` (or ``both``): the same stack with ``gateway.ingress: direct``,
   Ray Serve's direct ingress (the Gateway replica serves HTTP itself, no proxy hop).

The servers run side by side (each idle while another is measured) and are measured in
alternating order over several rounds, so the drift of a shared machine's background load falls
on both alike; each target's rounds are merged. Each round has two phases per target: the
scenario's open-loop Poisson load (latency: the TTFT moestack adds at p50 and p99, in
milliseconds) and a saturating closed loop (every request queued at once, ``max_concurrency`` in
flight: throughput ratio moestack / vLLM). Printed: the merged figures, then each round's ratios and
their medians (one disturbed round moves the merged figures, not the medians). The per-token
figure compared is TPOT (time per output token after the first): moestack relays a busy stream's
events in batches, so its ITL (the gap between events) is near zero inside a batch. On a 2-core
machine the engines, the gateway and the load generator share the cores, so added latency
includes CPU contention, not only extra hops.
Run it with a short TMPDIR (Ray's socket paths must stay under 108 bytes).

    .venv/bin/python benchmarks/gateway_overhead.py [--rounds 3] [--requests 60] [--rate 4]
        [--ingress proxy|direct|both]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from moestack.config import load_config
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from moestack.loadtest import load_scenario
from moestack.loadtest.compare import (
    TargetRun,
    measure,
    merge,
    start_server,
    stop_server,
    table,
)
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "loadtest" / "scenarios" / "gateway-overhead.yaml"
MODEL = "tiny-deepseek-v3"
MAX_MODEL_LEN = 1024
ENGINE_ENV = dict(load_config().models[0].env)
"""Both targets' engine environment: the embedded default's (KV cache size, OpenMP binding and
spin count), so moestack is measured as it ships and vLLM with the same engine settings."""


def start_vllm(checkpoint: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = start_server(
        "vLLM", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(checkpoint), "--served-model-name", MODEL, "--host", "127.0.0.1", "--port",
                 str(port), "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"],
        {**os.environ, **ENGINE_ENV, "TMPDIR": str(tmp)}, f"http://127.0.0.1:{port}/health",
        tmp / "vllm.log", timeout_s=600)
    return proc, port



def moestack_config(port: int, tmp: Path, ingress: str) -> dict:
    return {"models": [{"name": MODEL, "tiny": {"arch": "deepseek-v3", "seed": 0},
                        "architecture": "DeepseekV3ForCausalLM", "max_model_len": MAX_MODEL_LEN,
                        "max_ongoing_requests": 256,
                        "env": ENGINE_ENV, "engine_args": {"enforce_eager": True}}],
            "gateway": {"host": "127.0.0.1", "port": port, "ingress": ingress},
            "storage": {"url": f"sqlite:///{tmp / 'moestack.db'}"},
            "tenancy": {"enabled": True, "bootstrap_tenant": "bench"}, "ray": {"num_cpus": 2}}


def added(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{(a - b) * 1000:+.1f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, help="requests per target (default: scenario)")
    p.add_argument("--rate", type=float, help="arrival rate, requests/s (default: scenario)")
    p.add_argument("--saturate-requests", type=int, default=96, help="requests of the "
                   "saturating phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each measures both targets "
                   "(alternating which goes first) and the figures merge all rounds")
    p.add_argument("--ingress", choices=("proxy", "direct", "both"), default="proxy",
                   help="how requests enter Ray Serve: its HTTP proxy, direct ingress, or both "
                   "(one stack after the other, each against the same vLLM server)")
    args = p.parse_args()
    scenario = load_scenario(SCENARIO)
    if args.requests:
        scenario = scenario.replace(num_requests=args.requests)
    if args.rate:
        scenario = scenario.replace(arrival={**scenario.arrival.model_dump(),
                                             "rate_rps": args.rate})
    saturate = scenario.replace(name="saturate", num_requests=args.saturate_requests,
                                warmup_requests=0, seed=scenario.seed + 1,
                                arrival={**scenario.arrival.model_dump(), "rate_rps": None})
    checkpoint = ensure_tiny_model(TinySpec("deepseek-v3", 0), progress=print)
    tmp = Path(tempfile.mkdtemp(prefix="moestack-ovh-"))
    print(f"gateway overhead: {args.rounds} rounds of {scenario.num_requests} Poisson + "
          f"{saturate.num_requests} saturating streamed chat requests per target, "
          f"{scenario.arrival.process} arrivals at {scenario.arrival.rate_rps} req/s, "
          f"checkpoint {checkpoint.name}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} before the run", flush=True)
    vllm, port = start_vllm(checkpoint, tmp)
    modes = ("proxy", "direct") if args.ingress == "both" else (args.ingress,)
    rounds: dict[str, list[TargetRun]] = {}
    try:
        for mode in modes:
            stack_tmp = short_temp_dir()  # Ray's socket paths must stay short; a fresh store
            stack = start_stack(moestack_config(free_port(), stack_tmp, mode), stack_tmp)
            try:
                url, key = stack.base_url, stack.bootstrap_key()
                targets = [("vLLM", f"http://127.0.0.1:{port}/v1", vllm.pid, None),
                           (f"moestack {mode}", url, stack.proc.pid, key)]
                for i in range(args.rounds):
                    for name, target, pid, api_key in targets[::1 if i % 2 == 0 else -1]:
                        for phase, sc in (("Poisson", scenario), ("saturated", saturate)):
                            sc = sc.replace(seed=sc.seed + 100 * i)
                            run = measure(f"{name}, {phase}, round {i + 1}", sc, target, [pid],
                                          api_key=api_key)
                            rounds.setdefault(f"{name}, {phase}", []).append(run)
                            print(table([run]).splitlines()[-1], flush=True)
            finally:
                stack.stop()
                shutil.rmtree(stack_tmp, ignore_errors=True)
    finally:
        stop_server(vllm)
    runs = {name: merge(name, scenario if "Poisson" in name else saturate, rs)
            for name, rs in rounds.items()}
    vl, vl_sat = runs["vLLM, Poisson"], runs["vLLM, saturated"]
    print("\n" + table(list(runs.values())))
    thr = lambda r: r.report["throughput"]["output_tokens_per_s"]  # noqa: E731
    cpu = lambda r: r.server_cpu_s / max(1, len(r.results))  # noqa: E731
    for mode in modes:
        mo, mo_sat = runs[f"moestack {mode}, Poisson"], runs[f"moestack {mode}, saturated"]
        print(f"\nmoestack ({mode} ingress, tenancy on) adds TTFT p50 "
              f"{added(mo.latency('ttft', 'p50'), vl.latency('ttft', 'p50'))}, p99 "
              f"{added(mo.latency('ttft', 'p99'), vl.latency('ttft', 'p99'))}; TPOT p50 "
              f"{added(mo.latency('tpot', 'p50'), vl.latency('tpot', 'p50'))}; E2E p50 "
              f"{added(mo.latency('e2el', 'p50'), vl.latency('e2el', 'p50'))}")
        print(f"  saturated throughput moestack / vLLM: requests/s "
              f"{mo_sat.requests_per_s / vl_sat.requests_per_s:.3f}, output tokens/s "
              f"{thr(mo_sat) / thr(vl_sat):.3f}; server CPU per request (saturated) "
              f"{cpu(mo_sat) * 1000:.1f} ms vs {cpu(vl_sat) * 1000:.1f} ms = "
              f"{cpu(mo_sat) / cpu(vl_sat):.2f}x")
        print(per_round(rounds, mode))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def per_round(rounds: dict[str, list[TargetRun]], mode: str) -> str:
    """Each round's moestack / vLLM ratios and their medians: one disturbed round moves the
    merged figures, not the medians."""
    vl_sat, mo_sat = rounds["vLLM, saturated"], rounds[f"moestack {mode}, saturated"]
    vl, mo = rounds["vLLM, Poisson"], rounds[f"moestack {mode}, Poisson"]
    thr = [m.requests_per_s / v.requests_per_s for m, v in zip(mo_sat, vl_sat)]
    cpu = [m.cpu_ms_per_request / v.cpu_ms_per_request for m, v in zip(mo_sat, vl_sat)
           if m.cpu_ms_per_request and v.cpu_ms_per_request]
    ttft = {q: [(m.latency("ttft", q) - v.latency("ttft", q)) * 1000 for m, v in zip(mo, vl)]
            for q in ("p50", "p99")}
    rows = [f"  per round ({mode}): throughput {' '.join(f'{x:.2f}x' for x in thr)}; CPU "
            f"{' '.join(f'{x:.2f}x' for x in cpu)}; added TTFT p50 "
            f"{' '.join(f'{x:+.1f}' for x in ttft['p50'])} ms, p99 "
            f"{' '.join(f'{x:+.0f}' for x in ttft['p99'])} ms",
            f"  median of rounds ({mode}): throughput {statistics.median(thr):.3f}x, CPU "
            f"{statistics.median(cpu):.2f}x, added TTFT p50 {statistics.median(ttft['p50']):+.1f}"
            f" ms, p99 {statistics.median(ttft['p99']):+.1f} ms"]
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
