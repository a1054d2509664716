"""The load generator against moestack's gateway app over real HTTP (fake engine, timed)."""

import asyncio
import json

import httpx
import pytest

from moestack.cli import main
from moestack.loadtest import parse_scenario, run_scenario
from moestack.metering.pricing import load_pricing
from moestack.testing import fake_config, fake_model
from moestack.testing.gateway_server import serve_gateway

TTFT_S, INTERVAL_S = 0.05, 0.01


@pytest.fixture(scope="module")
def server():
    config = fake_config(fake_model(max_model_len=4096,
                                    fake={"ttft_s": TTFT_S, "token_interval_s": INTERVAL_S}))
    with serve_gateway(config) as s:
        yield s


def scenario(**over):
    raw = {"name": "run", "model": "fake-moe", "num_requests": 24, "max_concurrency": 8,
           "seed": 3, "arrival": {"process": "poisson", "rate_rps": 100},
           "tenants": [{"name": "a", "share": 2}, {"name": "b"}],
           "prompt_tokens": {"kind": "uniform", "mean": 20, "min": 10, "max": 30},
           "output_tokens": {"kind": "fixed", "mean": 6}, "slo": {"ttft_s": 1.0},
           "cost": {"usd_per_hour": 3.6}}
    raw.update(over)
    return parse_scenario(raw)


async def test_streamed_run_measures_ttft_itl_and_usage(server, tmp_path):
    run = await run_scenario(scenario(), server.base_url, {}, catalog=load_pricing(),
                             out_dir=tmp_path)
    rep = run.report
    assert rep["requests"]["completed"] == 24 and rep["requests"]["failed"] == 0
    lat = rep["latency_s"]
    assert TTFT_S <= lat["ttft"]["p50"] < TTFT_S + 0.2
    assert lat["itl"]["count"] == 24 * 5
    assert INTERVAL_S <= lat["itl"]["p50"] < INTERVAL_S + 0.05
    assert lat["e2el"]["p50"] >= TTFT_S + 5 * INTERVAL_S
    for r in run.results:
        assert r.completion_tokens == 6
        assert 10 + 3 <= r.prompt_tokens <= 30 + 3  # words plus the fake chat template's markers
    assert rep["throughput"]["goodput_requests_per_s"] == pytest.approx(
        rep["throughput"]["requests_per_s"])
    tenants = rep["fairness"]["tenants"]
    assert tenants["a"]["requests"] + tenants["b"]["requests"] == 24
    assert rep["cost"]["self_hosted_usd_per_1m_tokens"] > 0
    names = {p.name for p in run.files}
    assert {"report.json", "requests.jsonl", "latency_cdf.png", "timeline.png",
            "tenant_shares.png", "cost_per_1m_tokens.png"} <= names
    for p in run.files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["requests"]["sent"] == 24
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 24


async def test_completions_endpoint_without_streaming(server):
    run = await run_scenario(scenario(endpoint="completions", stream=False), server.base_url,
                             {}, plots=False)
    assert run.report["requests"]["completed"] == 24
    assert all(r.completion_tokens == 6 and r.ttft_s is None for r in run.results)


async def test_server_errors_are_counted_by_status_and_code(server):
    run = await run_scenario(scenario(model="no-such-model", num_requests=5), server.base_url,
                             {}, plots=False)
    assert run.report["requests"]["errors"] == {"404 model_not_found": 5}


async def test_unreachable_server_counts_connection_errors():
    run = await run_scenario(scenario(num_requests=3, timeout_s=5), "http://127.0.0.1:9/v1",
                             {}, plots=False)
    assert run.report["requests"]["failed"] == 3
    assert list(run.report["requests"]["errors"]) == ["ConnectError"]


async def test_concurrency_is_bounded(server):
    seen = []
    engine = server.engines["fake-moe"]
    run = scenario(num_requests=20, max_concurrency=3, arrival={"rate_rps": None})

    async def watch():
        while True:
            seen.append(engine.stats().running_requests)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    await run_scenario(run, server.base_url, {}, plots=False)
    watcher.cancel()
    assert max(seen) == 3


def test_cli_writes_report_and_prints_summary(server, tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: cli\nmodel: fake-moe\nnum_requests: 6\nmax_concurrency: 3\n"
        "tenants:\n  - {name: a, api_key_env: LT_KEY_A}\n  - {name: b}\n"
        "prompt_tokens: {mean: 8}\noutput_tokens: {mean: 4}\n")
    monkeypatch.setenv("LT_KEY_A", "sk-a")
    assert main(["loadtest", "--scenario", str(path), "--url", server.base_url,
                 "--api-key", "sk-default", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "requests: sent 6  completed 6  failed 0" in out
    assert "Jain's index" in out and "gpt-5.4" in out
    assert (tmp_path / "out" / "report.json").exists()


def test_cli_fails_when_a_tenant_key_variable_is_unset(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text("name: cli\nmodel: m\nnum_requests: 1\n"
                    "tenants: [{name: a, api_key_env: LT_UNSET_KEY}]\n"
                    "prompt_tokens: {mean: 8}\noutput_tokens: {mean: 4}\n")
    monkeypatch.delenv("LT_UNSET_KEY", raising=False)
    assert main(["loadtest", "--scenario", str(path), "--url", "http://127.0.0.1:9/v1"]) == 2
    assert "LT_UNSET_KEY" in capsys.readouterr().err


async def test_each_tenant_sends_its_own_api_key():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((body["messages"][0]["content"].split()[0],
                     request.headers.get("authorization")))
        return httpx.Response(200, json={"choices": [{"message": {"content": "x"}}],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    s = scenario(stream=False, num_requests=12)
    run = await run_scenario(s, "http://lt.test/v1", {"a": "sk-a", "b": "sk-b"}, plots=False,
                             transport=httpx.MockTransport(handler))
    by_index = {f"r{r.index}": r.tenant for r in run.results}
    assert len(seen) == 12
    for head, auth in seen:
        assert auth == f"Bearer sk-{by_index[head]}"
