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
   direct ingress (the Gateway replicas serve HTTP themselves on the public port, no proxy hop);
4. with ``--ingress chart`` (or ``all``, the three side by side): the Ray Serve configuration the
   Helm chart installs, run on a local Ray. The chart is rendered with a real Helm (default
   values), and its RayService's ``serveConfigV2`` is deployed exactly as KubeRay deploys it on
   the head pod: through Serve's controller from the config (Ray's own ``serve run CONFIG``
   path, ``client.deploy_apps``), with the head container's ``RAY_SERVE_*`` environment (and no
   other ``RAY_SERVE_*``) and the head's Ray node label that the Gateway deployment's
   ``label_selector`` asks for. Kept as rendered: ``proxy_location``, the deployment overrides
   (Gateway ``num_cpus: 0`` and label selector), the import path and every moestack setting of
   the chart (``gateway.ingress``, ``gateway.num_replicas``, tenancy, monitoring, ...). Swapped,
   because a CPU machine with no cluster cannot run them: in the moestack config, ``models`` (the
   chart's GPU checkpoint -> the same tiny DeepSeek-V3 model and engine settings as the other
   targets), ``storage`` (the chart's PostgreSQL, named by ``url_env`` -> a local SQLite file),
   ``cache_dir`` (the chart's model-cache volume -> the local default), ``gateway.host`` /
   ``operator_host`` 0.0.0.0 -> 127.0.0.1 and ``gateway.port`` / ``operator_port`` -> free ports
   (the serve config's ``http_options`` alike); Ray itself runs as one local node of 2 CPUs (the
   chart's head has ``num-cpus: 0`` and GPU workers carry the engines); the tenant ``bench`` is
   created in the store before the start (as ``moestack up`` creates its bootstrap tenant).

The servers run side by side (each idle while another is measured) and are measured in
alternating order over several rounds, so the drift of a shared machine's background load falls
on both alike; each target's rounds are merged (every ingress mode is compared with the vLLM
rounds interleaved with its own stack's). Each round has two phases per target: the
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
        [--output-tokens 32] [--warmup 3] [--ingress proxy|direct|chart|both|all] [--smoke]

``--smoke`` (the test suite's run): one round of a few short requests per phase and target
(one warm-up request); it also renders the chart and prepares the ``chart`` target's Serve
config (no stack: seconds), so a chart change that breaks that target fails the suite.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from moestack.config import load_config, parse_config
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from moestack.engine.vllm_engine import IN_CORE_WORKER_ENV
from moestack.loadtest import load_scenario
from moestack.loadtest.compare import (
    TargetRun,
    measure,
    merge,
    start_server,
    stop_server,
    table,
)
from moestack.testing.benchmark_args import parse_with_smoke
from moestack.testing.helm import helm_binary
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

CHART = Path(__file__).resolve().parents[1] / "helm" / "moestack"

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "loadtest" / "scenarios" / "gateway-overhead.yaml"
MODEL = "tiny-deepseek-v3"
MAX_MODEL_LEN = 1024
ENGINE_ENV = dict(load_config().models[0].env)
"""Both targets' engine environment: the embedded default's (KV cache size, OpenMP binding and
spin count), so moestack is measured as it ships and vLLM with the same engine settings; vLLM's
server also runs its one CPU worker in the engine-core process, as moestack's replicas do
(``IN_CORE_WORKER_ENV``)."""
SMOKE = {"rounds": 1, "requests": 4, "rate": 20.0, "saturate_requests": 4, "output_tokens": 8,
         "warmup": 1}
"""``--smoke``: the smallest run that still measures both phases on both targets."""
MODES = {"proxy": ("proxy",), "direct": ("direct",), "chart": ("chart",),
         "both": ("proxy", "direct"), "all": ("proxy", "direct", "chart")}


def start_vllm(checkpoint: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = start_server(
        "vLLM", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(checkpoint), "--served-model-name", MODEL, "--host", "127.0.0.1", "--port",
                 str(port), "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"],
        {**os.environ, **IN_CORE_WORKER_ENV, **ENGINE_ENV, "TMPDIR": str(tmp)},
        f"http://127.0.0.1:{port}/health",
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


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (the gateways' operator ports)."""
    import socket

    while True:
        first, taken = free_port(), []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()


@dataclass
class ChartServe:
    """What the chart makes KubeRay run on the head pod: Serve's config (``serveConfigV2``),
    the head container's ``RAY_SERVE_*`` environment and the head's Ray node labels."""

    serve_config: dict
    env: dict[str, str]
    labels: dict[str, str]



def render_chart(tmp: Path) -> ChartServe:
    """The chart with its default values, rendered by a real Helm (as `helm install` would)."""
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp / "helm-cache"),
           "HELM_CONFIG_HOME": str(tmp / "helm-config"), "HELM_DATA_HOME": str(tmp / "helm-data")}
    proc = subprocess.run([helm_binary(), "template", "moestack", str(CHART), "--api-versions",
                           "ray.io/v1/RayService"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"helm template failed:\n{proc.stderr}")
    (rayservice,) = [d for d in yaml.safe_load_all(proc.stdout)
                     if d and d["kind"] == "RayService"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("RAY_SERVE_")}
    labels = dict(kv.split("=", 1) for kv in head["rayStartParams"]["labels"].split(","))
    return ChartServe(yaml.safe_load(rayservice["spec"]["serveConfigV2"]), env, labels)


def chart_serve_config(chart: ChartServe, port: int, tmp: Path) -> dict:
    """The chart's Serve config with what this machine cannot run swapped (module docstring)."""
    (app,) = chart.serve_config["applications"]
    rendered = yaml.safe_load(app["args"]["config_yaml"])
    local = moestack_config(port, tmp, rendered["gateway"]["ingress"])
    config = {k: v for k, v in rendered.items() if k != "cache_dir"}
    config |= {"models": local["models"], "storage": local["storage"],
               "gateway": {**rendered["gateway"], "host": "127.0.0.1", "port": port,
                           "operator_host": "127.0.0.1",
                           "operator_port": free_ports(rendered["gateway"]["num_replicas"])}}
    parse_config(config, source="the chart's config, swapped for this machine")  # or raise
    http = {**chart.serve_config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    return {**chart.serve_config, "http_options": http,
            "applications": [{**app, "args": {"config_yaml": yaml.safe_dump(config)}}]}


def serve_rendered(spec_path: Path) -> int:
    """The ``chart`` target's process: a local Ray node with the head's labels, then Ray's own
    ``serve run CONFIG`` (deploy through Serve's controller, as KubeRay does) and wait for the
    app; serve until SIGTERM."""
    import ray
    from ray import serve
    from ray.serve.scripts import run as serve_run

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    spec = json.loads(spec_path.read_text())
    ray.init(num_cpus=spec["num_cpus"], labels=spec["labels"], namespace="serve",
             include_dashboard=False, logging_level="WARNING")
    signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which installs its own
    try:
        serve_run.main(["--non-blocking", spec["config_path"]], standalone_mode=False)
        while True:
            app = serve.status().applications.get(spec["app"])
            if app is not None and app.status.value == "RUNNING":
                print("the chart's app is RUNNING", flush=True)
                break
            if app is not None and app.status.value == "DEPLOY_FAILED":
                details = "; ".join(f"{n}: {d.message}" for n, d in app.deployments.items())
                print(f"the chart's app failed: {details or app.message}", flush=True)
                return 1
            time.sleep(1)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Stack:
    """A moestack under test: its process (CPU is counted over its tree), URL and tenant key."""

    pid: int
    base_url: str
    api_key: str | None
    stop: Callable[[], object]


def start_chart(tmp: Path) -> Stack:
    """The chart's Serve config on a local Ray (``serve_rendered`` in a child process)."""
    from moestack.serve.runner import ensure_bootstrap_key

    port, chart = free_port(), render_chart(tmp)
    serve_config = chart_serve_config(chart, port, tmp)
    (app,) = serve_config["applications"]
    config = parse_config(yaml.safe_load(app["args"]["config_yaml"]))
    key = ensure_bootstrap_key(config.model_copy(update={"tenancy": config.tenancy.model_copy(
        update={"bootstrap_tenant": "bench"})}))
    config_path = tmp / "serve-config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    spec_path = tmp / "chart-spec.json"
    spec_path.write_text(json.dumps({"num_cpus": 2, "labels": chart.labels, "app": app["name"],
                                     "config_path": str(config_path)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env |= chart.env | {"TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    proc = start_server("the chart's Serve config", [sys.executable, __file__,
                        "--serve-rendered", str(spec_path)], env,
                        f"http://127.0.0.1:{port}/health", tmp / "chart.log", timeout_s=600)
    return Stack(proc.pid, f"http://127.0.0.1:{port}/v1", key, lambda: stop_server(proc))


def start_up(mode: str, tmp: Path) -> Stack:
    """``moestack up`` with ``gateway.ingress: mode``."""
    stack = start_stack(moestack_config(free_port(), tmp, mode), tmp)
    return Stack(stack.proc.pid, stack.base_url, stack.bootstrap_key(), stack.stop)


def added(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{(a - b) * 1000:+.1f} ms"


def measure_rounds(args, modes: tuple[str, ...], checkpoint: Path, tmp: Path, scenario,
                   saturate) -> dict[str, list[TargetRun]]:
    """Each round's runs by "target, phase": one vLLM server, one stack per ingress mode, each
    stack's rounds interleaved with vLLM rounds of its own ("vLLM vs <mode>")."""
    rounds: dict[str, list[TargetRun]] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # vLLM's server starts while the first stack does (nothing is measured before both
        # are up): on a small machine the two startups' waits overlap.
        vllm_started = pool.submit(start_vllm, checkpoint, tmp)
        try:
            for mode in modes:
                stack_tmp = short_temp_dir()  # Ray's socket paths must stay short; a new store
                stack = start_chart(stack_tmp) if mode == "chart" else start_up(mode, stack_tmp)
                try:
                    vllm, port = vllm_started.result()
                    targets = [(f"vLLM vs {mode}", f"http://127.0.0.1:{port}/v1", vllm.pid, None),
                               (f"moestack {mode}", stack.base_url, stack.pid, stack.api_key)]
                    for i in range(args.rounds):
                        for name, target, pid, api_key in targets[::1 if i % 2 == 0 else -1]:
                            for phase, sc in (("Poisson", scenario), ("saturated", saturate)):
                                sc = sc.replace(seed=sc.seed + 100 * i)
                                run = measure(f"{name}, {phase}, round {i + 1}", sc, target,
                                              [pid], api_key=api_key)
                                rounds.setdefault(f"{name}, {phase}", []).append(run)
                                print(table([run]).splitlines()[-1], flush=True)
                finally:
                    stack.stop()
                    shutil.rmtree(stack_tmp, ignore_errors=True)
        finally:
            if vllm_started.exception() is None:  # waits for the start; a failed one left none
                stop_server(vllm_started.result()[0])
    return rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, help="requests per target (default: scenario)")
    p.add_argument("--rate", type=float, help="arrival rate, requests/s (default: scenario)")
    p.add_argument("--saturate-requests", type=int, default=96, help="requests of the "
                   "saturating phase")
    p.add_argument("--output-tokens", type=int, help="output tokens of every request "
                   "(default: scenario)")
    p.add_argument("--warmup", type=int, help="warm-up requests per target before its "
                   "Poisson phase (default: scenario)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each measures both targets "
                   "(alternating which goes first) and the figures merge all rounds")
    p.add_argument("--ingress", choices=tuple(MODES), default="proxy",
                   help="how requests enter Ray Serve: its HTTP proxy, direct ingress, the "
                   "Helm chart's Serve config (see above), both (proxy and direct) or all "
                   "three (one stack after the other, each against the same vLLM server)")
    p.add_argument("--serve-rendered", type=Path, help=argparse.SUPPRESS)  # the chart's child
    args = parse_with_smoke(p, argv, SMOKE)
    if args.serve_rendered:
        return serve_rendered(args.serve_rendered)
    scenario = load_scenario(SCENARIO)
    if args.requests:
        scenario = scenario.replace(num_requests=args.requests)
    if args.rate:
        scenario = scenario.replace(arrival={**scenario.arrival.model_dump(),
                                             "rate_rps": args.rate})
    if args.output_tokens:
        scenario = scenario.replace(output_tokens={"kind": "fixed", "mean": args.output_tokens})
    if args.warmup is not None:
        scenario = scenario.replace(warmup_requests=args.warmup)
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
    modes = MODES[args.ingress]
    if args.smoke and "chart" not in modes:
        print(check_chart_target(tmp), flush=True)
    rounds = measure_rounds(args, modes, checkpoint, tmp, scenario, saturate)
    runs = {name: merge(name, scenario if "Poisson" in name else saturate, rs)
            for name, rs in rounds.items()}
    print("\n" + table(list(runs.values())))
    thr = lambda r: r.report["throughput"]["output_tokens_per_s"]  # noqa: E731
    cpu = lambda r: r.server_cpu_s / max(1, len(r.results))  # noqa: E731
    summary = []
    for mode in modes:
        mo, mo_sat = runs[f"moestack {mode}, Poisson"], runs[f"moestack {mode}, saturated"]
        vl, vl_sat = runs[f"vLLM vs {mode}, Poisson"], runs[f"vLLM vs {mode}, saturated"]
        summary.append((mode, mo_sat.requests_per_s / vl_sat.requests_per_s,
                        added(mo.latency("ttft", "p50"), vl.latency("ttft", "p50")),
                        added(mo.latency("ttft", "p99"), vl.latency("ttft", "p99")),
                        cpu(mo_sat) * 1000, cpu(mo_sat) / cpu(vl_sat)))
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
    print("\n" + summary_table(summary))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def check_chart_target(tmp: Path) -> str:
    """Render the chart and prepare the ``chart`` target's Serve config, without running it."""
    from ray.serve.schema import ServeDeploySchema

    chart = render_chart(tmp)
    config = ServeDeploySchema.model_validate(chart_serve_config(chart, free_port(), tmp))
    (app,) = config.applications
    gateway = yaml.safe_load(app.args["config_yaml"])["gateway"]
    return (f"chart target: Serve config rendered and swapped (proxy_location "
            f"{config.proxy_location.value}, {gateway['ingress']} ingress, "
            f"{gateway['num_replicas']} gateway replicas, {len(chart.env)} RAY_SERVE_* "
            f"variables, node labels {chart.labels})")


def summary_table(rows: list[tuple]) -> str:
    """One row per ingress: the saturated throughput ratio, the TTFT added at p50 and p99 and
    the server CPU per request, each against the vLLM rounds interleaved with that stack's."""
    head = (f"{'ingress':<8} {'throughput vs vLLM':>19} {'TTFT p50 added':>15} "
            f"{'TTFT p99 added':>15} {'CPU ms/req':>11} {'CPU vs vLLM':>12}")
    lines = [head, "-" * len(head)]
    for mode, thr, p50, p99, cpu_ms, cpu_ratio in rows:
        lines.append(f"{mode:<8} {thr:>18.3f}x {p50:>15} {p99:>15} {cpu_ms:>11.1f} "
                     f"{cpu_ratio:>11.2f}x")
    return "\n".join(lines)


def per_round(rounds: dict[str, list[TargetRun]], mode: str) -> str:
    """Each round's moestack / vLLM ratios and their medians: one disturbed round moves the
    merged figures, not the medians."""
    vl_sat, mo_sat = rounds[f"vLLM vs {mode}, saturated"], rounds[f"moestack {mode}, saturated"]
    vl, mo = rounds[f"vLLM vs {mode}, Poisson"], rounds[f"moestack {mode}, Poisson"]
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
