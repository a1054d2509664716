"""A real Prometheus (Debian package) scrapes a running gateway (uvicorn, fake engine) with
moestack's recording rules loaded: the queries return the cost figures of a known workload, and
every Grafana panel expression is accepted by that Prometheus."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from moestack.api.app import build_api
from moestack.api.operator import build_operator_api
from moestack.api.backend import LocalBackend
from moestack.config import parse_config
from moestack.engine import build_engine
from moestack.metering.pricing import load_pricing
from moestack.testing.stack_process import free_port, short_temp_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((REPO / "monitoring" / "grafana" / "dashboards").glob("*.json"))
PREFILL_S, DECODE_S, CPU_USD_PER_HOUR = 1e-4, 1e-3, 36.0
PROMPT = " ".join(f"w{i}" for i in range(12))  # 12 tokens for the fake engine
MAX_TOKENS, REQUESTS = 20, 8
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$tenant": ".*", "$model": ".*"}


def _config():
    return parse_config({
        "models": [{"name": "m", "engine": "fake", "accelerator": "cpu", "cpus_per_worker": 1}],
        "tenancy": {"enabled": False},
        "cost": {"usd_per_gpu_hour": {"cpu": CPU_USD_PER_HOUR},
                 "engine_token_cost": {"m": {"prefill_s_per_token": PREFILL_S,
                                             "decode_s_per_token": DECODE_S}}},
    })


class _Prometheus:
    def __init__(self, target: str, tmp: Path):
        self.port = free_port()
        rule_files = []
        for path in RULES:  # the shipped rules, evaluated every second instead of their interval
            groups = yaml.safe_load(path.read_text())
            for group in groups["groups"]:
                group.pop("interval", None)
            rule_files.append(tmp / path.name)
            rule_files[-1].write_text(yaml.safe_dump(groups))
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(r) for r in rule_files],
               "scrape_configs": [{"job_name": "moestack",
                                   "static_configs": [{"targets": [target]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus not ready")

    def query(self, expr: str) -> dict:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        return r.json()

    def value(self, expr: str) -> dict[str, float]:
        res = self.query(expr)
        assert res["status"] == "success", (expr, res)
        return {json.dumps({k: v for k, v in s["metric"].items() if k != "__name__"},
                           sort_keys=True): float(s["value"][1])
                for s in res["data"]["result"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _wait_for(prom: _Prometheus, expr: str, ok, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        got = prom.value(expr)
        if ok(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.5)


@pytest.fixture
async def scraped_gateway():
    assert shutil.which("prometheus"), "prometheus is missing: scripts/install.sh installs it"
    config = _config()
    engine = build_engine(config.model("m"))
    await engine.start()
    app = build_api(config, LocalBackend({"m": engine}))
    port, operator_port = free_port(), free_port()
    # The public API, and the operator listener whose /metrics Prometheus scrapes.
    servers = [uvicorn.Server(uvicorn.Config(a, host="127.0.0.1", port=p, log_level="warning",
                                             lifespan="off"))
               for a, p in ((app, port), (build_operator_api(config, app.state.metrics, None),
                                          operator_port))]
    serving = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.05)
    prom = _Prometheus(f"127.0.0.1:{operator_port}", short_temp_dir())
    try:
        await asyncio.to_thread(prom.wait_ready)
        yield f"http://127.0.0.1:{port}", prom
    finally:
        prom.stop()
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*serving)
        engine.stop()


async def test_prometheus_reports_the_cost_of_a_known_workload(scraped_gateway):
    gateway, prom = scraped_gateway
    usage = []
    await _wait_for(prom, 'up{job="moestack"}', lambda v: list(v.values()) == [1.0])
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        for i in range(REQUESTS):
            if i == 2:  # counters appear with the first requests: let a scrape see them first,
                # so that rate() sees the increase the later requests make
                await _wait_for(prom, 'sum(moestack_tokens_total{kind="completion"})',
                                lambda v: list(v.values()) == [2.0 * MAX_TOKENS])
            r = await http.post("/v1/completions", json={"model": "m", "prompt": PROMPT,
                                                         "max_tokens": MAX_TOKENS})
            assert r.status_code == 200, r.text
            usage.append(r.json()["usage"])
    prompt = sum(u["prompt_tokens"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    assert (prompt, completion) == (12 * REQUESTS, MAX_TOKENS * REQUESTS)

    got = await _wait_for(prom, 'sum(moestack_tokens_total{kind="completion"})',
                          lambda v: list(v.values()) == [completion])
    assert list(got.values()) == [completion]

    # Every request priced at each baseline: exactly the catalog's prices for these tokens.
    catalog = load_pricing()
    baseline = prom.value("sum by (baseline) (moestack_baseline_cost_usd_total)")
    assert len(baseline) == len(catalog.baselines)
    for name, price in catalog.baselines.items():
        key = json.dumps({"baseline": name})
        assert baseline[key] == pytest.approx(price.usd(prompt, 0, completion), rel=1e-9)

    # Tenant cost = engine work at the replica's rate (below the cluster cost: paid in full).
    work_usd = (prompt * PREFILL_S + completion * DECODE_S) * CPU_USD_PER_HOUR / 3600
    got = await _wait_for(prom, "sum(moestack_tenant_cost_usd_total)",
                          lambda v: list(v.values()) == [pytest.approx(work_usd, rel=1e-9)])
    assert list(got.values()) == [pytest.approx(work_usd, rel=1e-9)]

    # Conservation in what Prometheus scraped: cluster = tenants + idle; cluster at 36 USD/h.
    gap = prom.value("sum(moestack_cluster_cost_usd_total) - sum(moestack_tenant_cost_usd_total)"
                     " - sum(moestack_idle_cost_usd_total)")
    assert abs(list(gap.values())[0]) < 1e-9
    assert list(prom.value("moestack_cluster_cost_usd_per_hour").values()) == [CPU_USD_PER_HOUR]
    assert list(prom.value("moestack_cluster_cpus").values()) == [1.0]

    # Recording rules over the scraped data: USD per 1M tokens at each baseline for this token
    # mix (every request has the same mix, so the rate ratio is exact).
    per_1m = await _wait_for(prom, "moestack:baseline_usd_per_1m_tokens:5m",
                             lambda v: len(v) == len(catalog.baselines))
    for name, price in catalog.baselines.items():
        expected = price.usd(prompt, 0, completion) / (prompt + completion) * 1e6
        assert per_1m[json.dumps({"baseline": name})] == pytest.approx(expected, rel=1e-6)
    for rule in ("moestack:self_hosted_usd_per_1m_tokens:5m", "moestack:utilisation:ratio5m",
                 "moestack:break_even_utilisation:ratio5m", "moestack:savings_usd_per_hour:5m"):
        assert prom.value(rule), f"{rule} has no data"
    util = list(prom.value("moestack:utilisation:ratio5m").values())[0]
    assert 0 < util < 1

    # Every dashboard panel expression is valid PromQL for this Prometheus.
    checked = 0
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                res = prom.query(expr)
                assert res["status"] == "success", (path.name, panel["title"], res)
                checked += 1
    assert checked >= 20
