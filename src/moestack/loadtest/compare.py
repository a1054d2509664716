"""Side-by-side runs for benchmark scripts: the same scenario against several targets.

Each target is measured in turn (never at once: on a small machine they would share cores) with
the same deterministic workload; the table printed at the end holds every figure and the ratios
between targets, all from one process run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moestack.loadtest.client import RequestResult
from moestack.loadtest.report import summarize
from moestack.loadtest.runner import run_scenario
from moestack.loadtest.scenario import Scenario


@dataclass
class TargetRun:
    """One target's figures (and the per-request results they were computed from)."""

    name: str
    report: dict
    server_cpu_s: float | None = None
    results: list[RequestResult] = field(default_factory=list)

    def latency(self, metric: str, stat: str) -> float | None:
        return self.report["latency_s"][metric][stat]

    @property
    def requests_per_s(self) -> float:
        return self.report["throughput"]["requests_per_s"]

    @property
    def cpu_ms_per_request(self) -> float | None:
        done = self.report["requests"]["completed"]
        if self.server_cpu_s is None or not done:
            return None
        return self.server_cpu_s / done * 1000


def process_tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and all their descendants."""
    import psutil

    total, seen = 0.0, set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    return total


def wait_http_ok(url: str, timeout_s: float = 300.0, interval_s: float = 0.5,
                 proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; raises TimeoutError after ``timeout_s`` or as soon as
    ``proc`` (the server process, if given) has exited."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TimeoutError(f"the server exited with code {proc.returncode} before {url} "
                               "answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:  # refused while starting, or an HTTP error status
            last = exc
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s: {last}")


def start_server(name: str, cmd: Sequence[str], env: dict[str, str], health_url: str,
                 log_path: Path, timeout_s: float) -> subprocess.Popen:
    """Start a server in its own session, logging to ``log_path``, and wait until ``health_url``
    answers 200; if it does not, stop it and raise with the end of its log."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http_ok(health_url, timeout_s=timeout_s, proc=proc)
    except TimeoutError:
        stop_server(proc)
        raise RuntimeError(f"{name} did not start:\n{log_path.read_text()[-3000:]}") from None
    return proc


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Terminate a server started in its own session; kill its process group if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(name: str, scenario: Scenario, base_url: str, server_pids: Sequence[int] = (),
            api_key: str | None = None) -> TargetRun:
    """Run ``scenario`` against ``base_url``; CPU of ``server_pids`` trees is counted over it."""
    keys = {t.name: api_key for t in scenario.tenants} if api_key else {}
    cpu_before = process_tree_cpu_s(server_pids) if server_pids else None
    run = asyncio.run(run_scenario(scenario, base_url, keys, plots=False))
    cpu = process_tree_cpu_s(server_pids) - cpu_before if server_pids else None
    return TargetRun(name, run.report, cpu, run.results)


def merge(name: str, scenario: Scenario, runs: Sequence[TargetRun]) -> TargetRun:
    """One target's rounds as one run: every request's figures, durations and CPU added up.

    Interleaving rounds of several targets and merging each target's rounds spreads the drift
    of a shared machine's background load evenly over the targets."""
    results = [r for run in runs for r in run.results]
    duration = sum(run.report["duration_s"] for run in runs)
    cpus = [run.server_cpu_s for run in runs]
    cpu = None if any(c is None for c in cpus) else sum(cpus)
    return TargetRun(name, summarize(scenario, results, duration), cpu, results)


def _f(value, scale=1.0, digits=1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(runs: Sequence[TargetRun]) -> str:
    """Figures of every target, one row each (latencies in ms)."""
    head = (f"{'target':<28} {'ok':>6} {'fail':>5} {'req/s':>8} {'out tok/s':>10} "
            f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'E2E p50':>8} {'E2E p99':>8} "
            f"{'srv CPU ms/req':>15}")
    rows = [head, "-" * len(head)]
    for r in runs:
        req = r.report["requests"]
        rows.append(
            f"{r.name:<28} {req['completed']:>6} {req['failed']:>5} {r.requests_per_s:>8.1f} "
            f"{r.report['throughput']['output_tokens_per_s']:>10.0f} "
            f"{_f(r.latency('ttft', 'p50'), 1000):>9} {_f(r.latency('ttft', 'p99'), 1000):>9} "
            f"{_f(r.latency('itl', 'p50'), 1000, 2):>8} "
            f"{_f(r.latency('e2el', 'p50'), 1000):>8} {_f(r.latency('e2el', 'p99'), 1000):>8} "
            f"{_f(r.cpu_ms_per_request, 1, 2):>15}")
        if req["errors"]:
            rows.append(f"{'':<28} errors: {req['errors']}")
    return "\n".join(rows)
