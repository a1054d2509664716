"""Reliability of the tenancy layer under load: wrong and revoked keys, and the usage ledger's
promise that every completed request is billed exactly once, also when clients disconnect and
when the gateway process is killed mid-load (its rows are closed as `lost` by a surviving gateway
once their lease runs out; nothing stays pending).

Gateways are moestack's gateway app over the fake engine, served by uvicorn, with the ledger in
a SQLite file."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from moestack.api.relay import REQUEST_ID_HEADER
from moestack.loadtest import parse_scenario, run_scenario
from moestack.loadtest.abuse import leave_before_first_token, leave_mid_stream
from moestack.loadtest.compare import wait_http_ok
from moestack.net import free_port
from moestack.tenancy import ledger
from moestack.tenancy.store import TenancyStore
from moestack.testing import fake_config
from moestack.testing.gateway_server import serve_gateway

pytestmark = pytest.mark.integration

ADMIN_ENV = "MOESTACK_RELIABILITY_ADMIN_KEY"
ADMIN_KEY = "admin-secret-for-tests-of-32-characters-or-more"
FAST, SLOW = "fake-moe", "slow-moe"


def models():
    return [{"name": FAST, "engine": "fake", "max_model_len": 4096,
             "fake": {"ttft_s": 0.01, "token_interval_s": 0.005}},
            {"name": SLOW, "engine": "fake", "max_model_len": 4096,
             "fake": {"ttft_s": 0.2, "token_interval_s": 0.05}}]


AUTH_TTL_S = 0.5


def tenancy(lease_s=60.0):
    return {"enabled": True, "bootstrap_tenant": None, "admin_key_env": ADMIN_ENV,
            "lease_s": lease_s, "auth_cache_ttl_s": AUTH_TTL_S,
            # every wrong key here comes from 127.0.0.1: no throttling (tested on its own)
            "auth_max_failures": 10_000}


@pytest.fixture(scope="module", autouse=True)
def admin_env():
    os.environ[ADMIN_ENV] = ADMIN_KEY
    yield
    os.environ.pop(ADMIN_ENV, None)


@pytest.fixture(scope="module")
def db_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"


@pytest.fixture(scope="module")
def server(db_url):
    config = fake_config(*models(), tenancy=tenancy(), storage={"url": db_url})
    with serve_gateway(config) as s:
        yield s


def admin(base_root: str):
    return httpx.Client(base_url=f"{base_root}/admin/v1",
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def new_tenant(root: str, name: str, **limits) -> tuple[str, str]:
    with admin(root) as http:
        # every model and no limit unless the test names them (not tenancy.new_tenant_defaults)
        resp = http.post("tenants", json={"name": name, "allowed_models": ["*"],
                                          "requests_per_min": None,
                                          "max_concurrent_requests": None, **limits})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return body["key_id"], body["api_key"]


def chat(model=FAST, max_tokens=8, stream=True):
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hello there"}]}


def rows(db_url) -> dict[str, ledger.LedgerEntry]:
    store = TenancyStore.open(db_url, migrate=False)
    try:
        return {r.request_id: r for r in ledger.query_usage(store)}
    finally:
        store.close()


def settled_rows(db_url, ids, timeout_s=10.0) -> dict[str, ledger.LedgerEntry]:
    """The ledger once the rows of ``ids`` are settled (gateways write settlements in batches,
    within ``settle_flush_interval_ms``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        billed = rows(db_url)
        if all(rid in billed and billed[rid].state == "settled" for rid in ids) or \
                time.monotonic() > deadline:
            return billed
        time.sleep(0.05)


@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer sk-wrong", "Basic abc",
                                  "Bearer msk-0123456789abcdef-unknownkeyid", "tampered"])
def test_wrong_or_missing_keys_get_401_on_every_openai_route(server, auth):
    _, good = new_tenant(server.operator_url, f"t-auth-{abs(hash(auth)) % 10**8}")
    if auth == "tampered":
        auth = "Bearer " + good[:-2] + ("aa" if not good.endswith("aa") else "bb")
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        for method, path, body in [("POST", "chat/completions", chat()),
                                   ("POST", "completions", {"model": FAST, "prompt": "hi"}),
                                   ("GET", "models", None), ("GET", "usage", None)]:
            resp = http.request(method, path, json=body)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"]["type"] == "authentication_error"


async def test_revoked_key_is_refused_but_streams_already_running_finish_and_bill(server, db_url):
    key_id, key = new_tenant(server.operator_url, "t-revoke")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as http:
        async def full_stream():
            async with http.stream("POST", "chat/completions",
                                   json=chat(SLOW, max_tokens=20)) as resp:
                assert resp.status_code == 200
                lines = [line async for line in resp.aiter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
            return resp.headers[REQUEST_ID_HEADER]

        running = [asyncio.create_task(full_stream()) for _ in range(5)]
        await asyncio.sleep(0.5)  # all five are streaming now
        with admin(server.operator_url) as adm:
            assert adm.delete(f"keys/{key_id}").status_code == 200
        await asyncio.sleep(AUTH_TTL_S + 0.1)  # every gateway drops cached keys within the TTL
        refused = await http.post("chat/completions", json=chat())
        ids = await asyncio.gather(*running)
    assert refused.status_code == 401
    billed = settled_rows(db_url, ids)
    for rid in ids:
        assert billed[rid].state == "settled" and billed[rid].status_code == 200
        assert billed[rid].completion_tokens == 20


async def test_multi_tenant_load_with_disconnects_bills_each_request_exactly_once(server,
                                                                                  db_url):
    keys = {name: new_tenant(server.operator_url, name)[1] for name in ("t-load-a", "t-load-b")}
    scenario = parse_scenario({
        "name": "billing", "model": FAST, "num_requests": 300, "max_concurrency": 100,
        "ignore_eos": False, "timeout_s": 120,
        "tenants": [{"name": "t-load-a", "share": 2}, {"name": "t-load-b"}],
        "prompt_tokens": {"kind": "uniform", "mean": 12, "min": 4, "max": 20},
        "output_tokens": {"kind": "uniform", "mean": 12, "min": 4, "max": 20}})
    load = asyncio.create_task(run_scenario(scenario, server.base_url, keys, plots=False))
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, headers={
            "Authorization": f"Bearer {keys['t-load-b']}"}) as http:
        left = await asyncio.gather(*(leave_mid_stream(http, chat(SLOW, max_tokens=100))
                                      for _ in range(20)))
        await asyncio.gather(*(leave_before_first_token(http, chat(SLOW, stream=False), 0.05)
                               for _ in range(10)))
    run = await load
    assert run.report["requests"]["failed"] == 0, run.report["requests"]["errors"]
    deadline = time.monotonic() + 30
    while any(r.state == "pending" for r in rows(db_url).values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    billed = rows(db_url)
    assert not [r for r in billed.values() if r.state == "pending"]
    for r in run.results:
        row = billed[r.ledger_id]
        assert (row.state, row.status_code, row.tenant) == ("settled", 200, r.tenant)
        assert (row.prompt_tokens, row.completion_tokens) == (r.prompt_tokens,
                                                               r.completion_tokens)
        assert row.charged_tokens == r.prompt_tokens + r.completion_tokens
    for rid in left:
        assert billed[rid].state == "settled" and billed[rid].status_code == 499
        assert 0 < billed[rid].completion_tokens < 100


def _gateway_process(config_path, port, env, operator_port=None):
    return subprocess.Popen(
        [sys.executable, "-m", "moestack.testing.gateway_server", "--config", str(config_path),
         "--port", str(port), "--operator-port", str(operator_port or free_port())], env=env,
        start_new_session=True)


async def test_gateway_killed_mid_load_bills_completed_requests_once_and_closes_the_rest(
        tmp_path):
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump({"models": models(), "tenancy": tenancy(lease_s=1.5),
                                           "storage": {"url": db_url}}))
    env = {**os.environ, ADMIN_ENV: ADMIN_KEY}
    port, operator_port = free_port(), free_port()
    first = _gateway_process(config_path, port, env, operator_port)
    survivor = None
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=first)
        _, key = new_tenant(f"http://127.0.0.1:{operator_port}", "t-crash")
        scenario = parse_scenario({
            "name": "crash", "model": SLOW, "num_requests": 60, "max_concurrency": 60,
            "ignore_eos": False, "timeout_s": 60, "arrival": {"process": "constant",
                                                              "rate_rps": 20},
            "tenants": [{"name": "t-crash"}], "prompt_tokens": {"mean": 8},
            "output_tokens": {"kind": "uniform", "mean": 20, "min": 4, "max": 40}})
        load = asyncio.create_task(run_scenario(scenario, f"http://127.0.0.1:{port}/v1",
                                                {"t-crash": key}, plots=False))
        await asyncio.sleep(2.0)  # some requests finished, many are mid-stream
        first.send_signal(signal.SIGKILL)
        first.wait()
        run = await load
        completed = [r for r in run.results if r.ok]
        broken = [r for r in run.results if not r.ok]
        assert completed and broken  # the kill really happened mid-load

        survivor_port = free_port()
        survivor = _gateway_process(config_path, survivor_port, env)
        wait_http_ok(f"http://127.0.0.1:{survivor_port}/health", timeout_s=60, proc=survivor)
        async with httpx.AsyncClient(timeout=30) as http:  # starts the survivor's heartbeat
            resp = await http.post(f"http://127.0.0.1:{survivor_port}/v1/chat/completions",
                                   json=chat(stream=False),
                                   headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 200
        deadline = time.monotonic() + 30
        while any(r.state == "pending" for r in rows(db_url).values()) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        billed = rows(db_url)
    finally:
        for proc in (first, survivor):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    assert not [r for r in billed.values() if r.state == "pending"]
    for r in completed:
        row = billed[r.ledger_id]
        assert (row.state, row.status_code) == ("settled", 200)
        assert row.completion_tokens == r.completion_tokens
    crash_rows = [r for r in billed.values() if r.request_id != resp.headers[REQUEST_ID_HEADER]]
    assert len(crash_rows) == len({r.request_id for r in crash_rows})
    lost = [r for r in crash_rows if r.state == "lost"]
    assert lost and all(r.error_code == "gateway_lost" for r in lost)
    assert all(r.charged_tokens > 0 for r in lost)  # the reservation is kept as the charge
    assert len(completed) + len(lost) <= len(crash_rows) <= len(run.results)
