"""Benchmarks cannot rot: every script in ``benchmarks/`` runs with ``--smoke`` and prints its
figures (the ones that start no Ray, vLLM or database server here, the others in
``tests/integration/test_benchmarks_smoke.py``), and every shipped load-test scenario runs at
smoke size through ``moestack loadtest`` against the gateway app over real HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moestack.cli import main
from moestack.loadtest import load_scenario
from moestack.testing.gateway_server import serve_gateway
from moestack.tenancy import TenancyStore
from moestack.testing import fake_config, fake_model

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCENARIOS = sorted((ROOT / "loadtest" / "scenarios").glob("*.yaml"))
NUM = r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?"
"""A printed figure: 12, 1,234, 0.5, -3.2, 6.763e-04."""

POLICIES = ("random", "least_outstanding_tokens", r"prefix_affinity",
            r"prefix_affinity \(no load guard\)", "tenant_prefix_affinity")
RELIABILITY_PHASES = (
    "20 concurrent streams", "leave mid-stream", "leave before first token",
    "20 requests beside 10 slow-headers clients", "20 requests beside 10 slow-body clients",
    "malformed and oversized bodies", "wrong, tampered, missing and revoked keys",
    r"20 two-tenant requests \+ 30 leaving, vs ledger", "gateway SIGKILLed mid-load, vs ledger")

FIGURES = {
    "fair_dispatch_cost.py": [
        rf"^\s+{n}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}$" for n in (30, 60)],
    "plan_layouts.py": [
        r"^context 32768 tokens$",
        *(rf"^{model}\s+\d+ \w+\s+TP=\d+ PP=\d+ DP=\d+ EP=\S+\s+(yes|NO)\s+{NUM}\s+{NUM}\s+{NUM}"
          rf"\s+{NUM}\s+{NUM}\s+{NUM}" for model in ("deepseek-v4-flash", "kimi-k2",
                                                     "qwen3-235b-a22b", "mixtral-8x22b"))],
    "lora_routing.py": [
        *(rf"^{v}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+\d+/\d+$"
          for v in ("affinity", "no-affinity")),
        rf"^no-affinity / affinity: loads {NUM}x, TTFT p50 {NUM}x, p95 {NUM}x; throughput "
        rf"affinity / no-affinity {NUM}x$",
        r"^plot: .*lora_routing\.png$"],
    "routing.py": [
        *(rf"^workload: {w}$" for w in ("shared-prefixes", "hot-prefix", "unique-prompts")),
        *(rf"^{p}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}$" for p in POLICIES),
        rf"^least_outstanding_tokens\s+{NUM}\s+{NUM}\s+1\.00\s+{NUM}\s+1\.00\s+{NUM}\s+{NUM}$"],
    "overflow.py": [
        *(rf"^{setup}\s+\d+\s+0\s+{NUM}(\s+({NUM}|-)){{4}}(\s+{NUM}){{4}}$"
          for setup in ("no-overflow", "overflow", "all-api")),
        rf"^opted-in tenant TTFT p95 with overflow: ({NUM}|-) ms vs bound {NUM} ms",
        r"^ledger rows = requests: no-overflow (\d+)/\1, overflow (\d+)/\2, all-api (\d+)/\3$",
        r"^plot: .*overflow-smoke\.png$"],
    # Exit status 0 already says nothing failed, was lost or was billed twice.
    "reliability.py": [
        *(rf"^{phase}\s+\d+\s+0\s+0\s+0\s" for phase in RELIABILITY_PHASES),
        r"^total\s+\d+\s+0\s+0\s+0$"],
}
"""Benchmarks run here -> the figure lines their smoke run must print (regexes, per line)."""


def run_benchmark(script: str, *args: str, timeout_s: float = 300,
                  env: dict[str, str] | None = None) -> str:
    """``benchmarks/<script> --smoke *args`` in a fresh process; its stdout. On a timeout the
    process group gets SIGINT (so the script's cleanup runs), then SIGKILL."""
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / script), "--smoke", *args],
                            cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{script} --smoke ran over {timeout_s} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, (f"{script} --smoke exited with {proc.returncode}:\n"
                                  f"{out[-4000:]}\n--- stderr ---\n{err[-6000:]}")
    return out


def assert_figures(script: str, out: str, patterns: list[str]) -> None:
    missing = [p for p in patterns if not re.search(p, out, re.MULTILINE)]
    assert not missing, f"{script} --smoke did not print {missing}; it printed:\n{out[-6000:]}"


def test_every_benchmark_script_has_a_smoke_test():
    from tests.integration.test_benchmarks_smoke import FIGURES as INTEGRATION

    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(FIGURES) | set(INTEGRATION)
    assert not set(FIGURES) & set(INTEGRATION)


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_benchmark_runs_at_smoke_size_and_prints_its_figures(script):
    out = run_benchmark(script)
    assert_figures(script, out, FIGURES[script])


SMOKE_REQUESTS = 6
"""Requests per scenario at smoke size (more than any shipped scenario's tenants)."""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The gateway app over fake engines named as every scenario's model, tenancy on."""
    db = f"sqlite:///{tmp_path_factory.mktemp('scenarios') / 'ledger.db'}"
    models = sorted({load_scenario(p).model for p in SCENARIOS})
    config = fake_config(*(fake_model(m, max_model_len=8192,
                                      fake={"ttft_s": 0.01, "token_interval_s": 0.002})
                           for m in models),
                         storage={"url": db}, tenancy={"enabled": True, "bootstrap_tenant": None})
    store = TenancyStore.open(db)
    try:
        with serve_gateway(config) as server:
            yield server, store
    finally:
        store.close()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_runs_at_smoke_size_with_each_tenants_key(path, gateway, capsys, monkeypatch):
    server, store = gateway
    scenario = load_scenario(path)
    for tenant in scenario.tenants:  # a tenant of its own behind each key variable
        if tenant.api_key_env:
            _, key = store.create_tenant(f"{scenario.name}-{tenant.name}", weight=tenant.weight)
            monkeypatch.setenv(tenant.api_key_env, key.plaintext)
    _, default = store.create_tenant(f"{scenario.name}-default")
    assert main(["loadtest", "--scenario", str(path), "--url", server.base_url,
                 "--api-key", default.plaintext, "--num-requests", str(SMOKE_REQUESTS),
                 "--no-plots"]) == 0
    out = capsys.readouterr().out
    sent = SMOKE_REQUESTS  # warm-up requests are not counted
    assert f"requests: sent {sent}  completed {sent}  failed 0" in out, out
    assert re.search(rf"^throughput: {NUM} req/s\s+{NUM} output tok/s", out, re.MULTILINE), out
    assert re.search(rf"^fairness: Jain's index ({NUM}|-)$", out, re.MULTILINE), out
    assert re.search(rf"^USD per 1M tokens: self-hosted ({NUM}|-)$", out, re.MULTILINE), out
