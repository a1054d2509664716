"""Gateway capacity on this machine with a fast fake backend, moestack next to LiteLLM proxy.

Three targets get the same streamed load (loadtest/scenarios/gateway-capacity.yaml: short
requests, closed loop at a fixed concurrency), one after the other:

1. backend alone: moestack's OpenAI app over the fake engine in one uvicorn process (the ceiling
   of the load generator plus the backend on these cores);
2. LiteLLM proxy (PyPI ``litellm[proxy]``, installed by this script into its own virtualenv under
   the cache folder, never into moestack's environment) in front of that same backend process;
3. moestack: ``moestack up`` with ``engine: fake`` (Gateway deployment -> ModelServer deployment
   running the fake engine), once per ingress of ``--ingress`` (``proxy``: Ray Serve's HTTP
   proxy in front; ``direct``: the Gateway replicas serve HTTP themselves, as the local default
   and the Helm chart run it) and per tenancy setting of ``--tenancy`` (``off``; ``on``: API
   keys, admission and the usage ledger on SQLite, one tenant without limits).

Printed: sustained streaming requests/s, TTFT/E2E percentiles, CPU milliseconds the server
processes spent per request (for moestack also split by process: Gateway replica, ModelServer
replica, Ray's own processes), and the ratios moestack / LiteLLM. The load generator runs on the
same cores, so absolute figures are lower bounds of each server's capacity; the ratios compare
like with like.

    .venv/bin/python benchmarks/gateway_capacity.py [--requests 2000] [--concurrency 64]
        [--ingress proxy|direct|both] [--tenancy off|on|both] [--skip-litellm] [--smoke]

``--smoke`` (the test suite's run): a few dozen requests per target, LiteLLM skipped (installing
it needs the package registry), direct ingress with tenancy on only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from moestack.engine.tiny import default_cache_dir
from moestack.loadtest import load_scenario
from moestack.loadtest.compare import (
    TargetRun,
    measure,
    start_server,
    stop_server,
    table,
    wait_http_ok,
)
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack
from moestack.testing.benchmark_args import parse_with_smoke

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "loadtest" / "scenarios" / "gateway-capacity.yaml"
LITELLM_SPEC = "litellm[proxy]"
SMOKE = {"requests": 40, "concurrency": 8, "warmup_requests": 10, "skip_litellm": True,
         "ingress": "direct", "tenancy": "on"}
CHOICES = {"proxy": ("proxy",), "direct": ("direct",), "both": ("proxy", "direct"),
           "off": (False,), "on": (True,)}
"""``--smoke``: the smallest load that still measures each target."""


def litellm_venv() -> Path:
    """A virtualenv with LiteLLM proxy, created on first use under the cache folder."""
    venv = default_cache_dir() / "litellm-venv"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"installing {LITELLM_SPEC} into {venv} (first run only) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--progress-bar",
                        "off", LITELLM_SPEC], check=True)
    return venv


def start_backend(port: int, tmp: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moestack.testing.gateway_server", "--port", str(port)],
        env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True)
    wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=proc)
    return proc


def start_litellm(backend_port: int, tmp: Path, master_key: str
                  ) -> tuple[subprocess.Popen, int]:
    venv = litellm_venv()
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "fake-moe", "litellm_params": {
            "model": "openai/fake-moe", "api_base": f"http://127.0.0.1:{backend_port}/v1",
            "api_key": "none"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        # LiteLLM refuses to start without a master key; checking it is its cheapest auth path.
        "general_settings": {"master_key": master_key},
    }))
    env = {**os.environ, "TMPDIR": str(tmp), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true"}
    env.pop("DATABASE_URL", None)
    proc = start_server(
        "LiteLLM", [str(venv / "bin" / "litellm"), "--config", str(config), "--host",
                    "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        env, f"http://127.0.0.1:{port}/health/liveliness", tmp / "litellm.log", timeout_s=180)
    return proc, port



def moestack_config(port: int, tmp: Path, ingress: str = "proxy",
                    tenancy: bool = False) -> dict:
    return {"models": [{"name": "fake-moe", "engine": "fake", "max_model_len": 65536,
                        "max_ongoing_requests": 1024}],
            "gateway": {"host": "127.0.0.1", "port": port, "ingress": ingress},
            "storage": {"url": f"sqlite:///{tmp / 'moestack.db'}"},
            "tenancy": {"enabled": True, "bootstrap_tenant": "bench"} if tenancy
            else {"enabled": False}, "ray": {"num_cpus": 2}}


def cpu_by_process(root_pid: int) -> dict[str, float]:
    """CPU seconds so far of a stack's processes, by role: its Gateway and ModelServer
    replicas, Serve's HTTP proxy, and the rest (Ray's controller, GCS, raylet, the
    ``moestack up`` process)."""
    import psutil

    roles = {"moestack:Gateway": "Gateway", "moestack:ModelServer": "ModelServer",
             "ProxyActor": "Serve proxy"}
    out = dict.fromkeys((*roles.values(), "Ray and driver"), 0.0)
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd, t = " ".join(p.cmdline()), p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        role = next((r for m, r in roles.items() if m in cmd), "Ray and driver")
        out[role] += t.user + t.system
    return out


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, help="requests per target (default: scenario)")
    p.add_argument("--concurrency", type=int, help="requests in flight (default: scenario)")
    p.add_argument("--warmup-requests", type=int, default=100, help="unmeasured requests sent "
                   "to each target first")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--ingress", choices=("proxy", "direct", "both"), default="both",
                   help="how requests enter the moestack stack (one stack per choice)")
    p.add_argument("--tenancy", choices=("off", "on", "both"), default="both",
                   help="tenancy (keys, admission, usage ledger) in the moestack stack")
    args = parse_with_smoke(p, argv, SMOKE)
    scenario = load_scenario(SCENARIO)
    scenario = scenario.replace(**{k: v for k, v in (("num_requests", args.requests),
                                                      ("max_concurrency", args.concurrency))
                                   if v})
    warm = scenario.replace(num_requests=args.warmup_requests, seed=scenario.seed + 1)
    tmp = Path(tempfile.mkdtemp(prefix="moestack-cap-"))
    print(f"gateway capacity: {scenario.num_requests} streamed requests per target, "
          f"{scenario.max_concurrency} in flight, {scenario.prompt_tokens.mean:g} prompt / "
          f"{scenario.output_tokens.mean:g} output tokens; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} before the run", flush=True)
    runs: list[TargetRun] = []
    backend_port = free_port()
    backend = start_backend(backend_port, tmp)
    try:
        url = f"http://127.0.0.1:{backend_port}/v1"
        measure("warm-up", warm, url)
        runs.append(measure("backend alone (uvicorn)", scenario, url, [backend.pid]))
        print(table(runs[-1:]), flush=True)
        if args.skip_litellm:
            print("LiteLLM proxy skipped (--skip-litellm or --smoke)", flush=True)
        else:
            master_key = "sk-" + secrets.token_hex(16)
            litellm, port = start_litellm(backend_port, tmp, master_key)
            try:
                url = f"http://127.0.0.1:{port}/v1"
                measure("warm-up", warm, url, api_key=master_key)
                runs.append(measure("LiteLLM proxy -> backend", scenario, url,
                                    [litellm.pid, backend.pid], api_key=master_key))
                print(table(runs[-1:]), flush=True)
            finally:
                stop_server(litellm)
    finally:
        stop_server(backend)
    stacks = []
    for ingress in CHOICES[args.ingress]:
        for tenancy in (False, True) if args.tenancy == "both" else CHOICES[args.tenancy]:
            stack_tmp = short_temp_dir()  # Ray's socket paths must stay short
            stack = start_stack(moestack_config(free_port(), stack_tmp, ingress, tenancy),
                                stack_tmp)
            key = stack.bootstrap_key() if tenancy else None
            try:
                measure("warm-up", warm, stack.base_url, api_key=key)
                before = cpu_by_process(stack.proc.pid)
                runs.append(measure(f"moestack {ingress}, tenancy {'on' if tenancy else 'off'}",
                                    scenario, stack.base_url, [stack.proc.pid], api_key=key))
                after = cpu_by_process(stack.proc.pid)
                stacks.append(runs[-1])
                done = runs[-1].report["requests"]["completed"] or 1
                print(table(runs[-1:]), flush=True)
                print("  server CPU by process (ms/request): " + ", ".join(
                    f"{role} {(after[role] - before[role]) * 1000 / done:.2f}"
                    for role in after), flush=True)
            finally:
                stack.stop()
                shutil.rmtree(stack_tmp, ignore_errors=True)
    print("\n" + table(runs))
    print(f"load average after the run {os.getloadavg()[0]:.1f}")
    by = {r.name.split(" ")[0]: r for r in runs}
    backend_run, li = by["backend"], by.get("LiteLLM")
    print("\nmoestack (server CPU per request: targets <= 6 ms tenancy off, <= 8 ms on; "
          "requests/s >= 0.5x backend alone, >= 5x LiteLLM)")
    for mo in stacks:
        line = (f"  {mo.name:<28} CPU {mo.cpu_ms_per_request or 0:.1f} ms/request, requests/s "
                f"{ratio(mo.requests_per_s, backend_run.requests_per_s)} backend alone")
        if li:
            line += (f", {ratio(mo.requests_per_s, li.requests_per_s)} LiteLLM, TTFT p50 "
                     f"{ratio(mo.latency('ttft', 'p50'), li.latency('ttft', 'p50'))}, TTFT p99 "
                     f"{ratio(mo.latency('ttft', 'p99'), li.latency('ttft', 'p99'))}, CPU "
                     f"{ratio(mo.cpu_ms_per_request, li.cpu_ms_per_request)}")
        print(line)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
