"""Overflow to external providers through the real gateway (uvicorn, fair queue, tenancy, ledger
in SQLite, fake engine with two batch slots) against fake providers on loopback (an
OpenAI-compatible one and an Anthropic one, real HTTP servers), driven by the official `openai`
and `anthropic` clients. Every request must leave exactly one ledger row naming its backend, with
the provider's tokens at the provider's prices."""

import asyncio
import dataclasses
import os
import time

import anthropic
import httpx
import openai
import pytest

from moestack.metering.pricing import load_pricing
from moestack.tenancy import ledger
from moestack.tenancy.store import TenancyStore
from moestack.testing import fake_config
from moestack.testing.fake_providers import serve_fake_provider
from moestack.testing.gateway_server import serve_gateway

pytestmark = pytest.mark.integration

ADMIN_ENV = "MOESTACK_OVERFLOW_TEST_ADMIN_KEY"
ADMIN_KEY = "admin-secret-for-overflow-tests-32-characters-or-more"
OPENAI_KEY_ENV, ANTHROPIC_KEY_ENV = "OVERFLOW_TEST_OPENAI_KEY", "OVERFLOW_TEST_ANTHROPIC_KEY"
OPENAI_KEY, ANTHROPIC_KEY = "sk-provider-openai-secret", "sk-provider-anthropic-secret"
MODEL, CLAUDE_MODEL, FRESH_MODEL = "fake-moe", "claude-moe", "fresh-moe"
MESSAGES_FIELDS = frozenset({"model", "messages", "max_tokens", "stream", "system",
                             "temperature", "metadata", "stop_sequences", "top_p", "top_k"})


@pytest.fixture(scope="module")
def providers():
    with serve_fake_provider("openai", OPENAI_KEY) as oai, \
            serve_fake_provider("anthropic", ANTHROPIC_KEY) as claude:
        yield oai, claude


@pytest.fixture(scope="module")
def db_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('overflow') / 'ledger.db'}"


@pytest.fixture(scope="module")
def server(providers, db_url):
    oai, claude = providers
    keys = {ADMIN_ENV: ADMIN_KEY, OPENAI_KEY_ENV: OPENAI_KEY, ANTHROPIC_KEY_ENV: ANTHROPIC_KEY}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)  # restored below: later tests run without an admin key
    fake = {"ttft_s": 0.01, "token_interval_s": 0.02, "max_num_seqs": 2}
    config = fake_config(
        {"name": MODEL, "engine": "fake", "max_model_len": 4096, "fake": fake},
        {"name": CLAUDE_MODEL, "engine": "fake", "max_model_len": 4096, "fake": fake},
        {"name": FRESH_MODEL, "engine": "fake", "max_model_len": 4096, "fake": fake},
        storage={"url": db_url},
        tenancy={"enabled": True, "bootstrap_tenant": None, "admin_key_env": ADMIN_ENV,
                 "auth_cache_ttl_s": 0.2,
                 "fair_queue": {"max_inflight_requests_per_model": 2}},
        overflow={
            "providers": [
                {"name": "oai", "kind": "openai", "base_url": oai.base_url,
                 "api_key_env": OPENAI_KEY_ENV, "model": "gpt-5.4"},
                {"name": "claude", "kind": "anthropic", "base_url": claude.base_url,
                 "api_key_env": ANTHROPIC_KEY_ENV, "model": "claude-sonnet-4.6"}],
            "rules": [{"model": MODEL, "provider": "oai", "max_queue_wait_ms": 50},
                      {"model": CLAUDE_MODEL, "provider": "claude"},
                      {"model": FRESH_MODEL, "provider": "oai", "max_queue_wait_ms": 50}]})
    with serve_gateway(config) as s:
        relay = s.app.state.relay  # the fake engine speaks OpenAI only; vLLM serves Messages
        info = s.engines[CLAUDE_MODEL].info
        relay._infos[CLAUDE_MODEL] = dataclasses.replace(
            info, request_fields={**info.request_fields, "/v1/messages": MESSAGES_FIELDS})
        yield s
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for env in (ADMIN_ENV, OPENAI_KEY_ENV, ANTHROPIC_KEY_ENV):
        os.environ.pop(env, None)


def new_tenant(server, name: str, **settings) -> str:
    with httpx.Client(base_url=f"{server.operator_url}/admin/v1", timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        resp = http.post("tenants", json={"name": name, "allowed_models": ["*"],
                                          "requests_per_min": None,
                                          "max_concurrent_requests": None, **settings})
        assert resp.status_code == 201, resp.text
        return resp.json()["api_key"]


def settled(db_url, tenant: str, count: int, timeout_s: float = 15.0) -> list:
    """The tenant's ledger rows once ``count`` of them are settled (and no more exist)."""
    deadline = time.monotonic() + timeout_s
    while True:
        store = TenancyStore.open(db_url, migrate=False)
        try:
            rows = ledger.query_usage(store, tenant=tenant)
        finally:
            store.close()
        if (len(rows) >= count and all(r.state == "settled" for r in rows)) or \
                time.monotonic() > deadline:
            assert len(rows) == count, [(r.backend, r.status_code) for r in rows]
            assert all(r.state == "settled" for r in rows)
            return rows


PRICES = load_pricing().baselines


def provider_usd(baseline: str, prompt: int, completion: int) -> float:
    return PRICES[baseline].usd(prompt, 0, completion)


def oai_client(server, key):
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


async def test_long_predicted_wait_overflows_the_opted_in_tenant_and_never_the_others(
        server, providers, db_url):
    oai, _ = providers
    bursty = new_tenant(server, "t-wait-allowed", overflow_policy="allowed",
                        overflow_budget_usd=10.0)
    busy = new_tenant(server, "t-wait-never")
    quiet = new_tenant(server, "t-wait-never-2")
    async with oai_client(server, busy) as c_busy, oai_client(server, bursty) as c_bursty, \
            oai_client(server, quiet) as c_quiet:
        # One request ends first, so the fair queue knows how long a slot is held.
        await c_busy.chat.completions.create(model=MODEL, max_tokens=10, messages=[
            {"role": "user", "content": "warm up"}])
        hogs = [asyncio.create_task(c_busy.chat.completions.create(
            model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "long one"}]))
            for _ in range(4)]
        await asyncio.sleep(0.3)  # two run, two wait: a wait of seconds for anyone new
        seen_before = len(oai.seen)
        stream = await c_bursty.chat.completions.create(
            model=MODEL, max_tokens=7, stream=True,
            messages=[{"role": "user", "content": "one two three four"}])
        chunks = [c async for c in stream]
        waited = asyncio.create_task(c_quiet.chat.completions.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "i wait"}]))
        done = await asyncio.gather(*hogs, waited)
    assert len(oai.seen) == seen_before + 1  # only the opted-in tenant's request
    sent = oai.seen[-1]
    assert sent.body["model"] == "gpt-5.4" and sent.body["stream_options"] == {
        "include_usage": True}
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "priority" not in sent.body and "cache_salt" not in sent.body
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"w{i}" for i in range(7)]
    assert all(c.usage is None for c in chunks)  # it did not ask for the usage chunk
    assert all(r.usage.completion_tokens in (5, 60) for r in done)
    [row] = settled(db_url, "t-wait-allowed", 1)
    assert (row.backend, row.status_code, row.prompt_tokens, row.completion_tokens) == (
        "provider:oai", 200, 4, 7)
    assert row.cost_usd == pytest.approx(provider_usd("gpt-5.4", 4, 7), abs=1e-9)
    others = settled(db_url, "t-wait-never", 5) + settled(db_url, "t-wait-never-2", 1)
    assert {r.backend for r in others} == {"replica"}


async def test_no_healthy_replica_overflows_openai_and_anthropic_clients_within_budget(
        server, providers, db_url):
    oai, claude = providers
    allowed = new_tenant(server, "t-down-allowed", overflow_policy="allowed",
                         overflow_budget_usd=1.0)
    never = new_tenant(server, "t-down-never")
    broke = new_tenant(server, "t-down-broke", overflow_policy="allowed",
                       overflow_budget_usd=1e-7)
    for engine in server.engines.values():
        engine.healthy = False
    try:
        async with oai_client(server, allowed) as c:
            whole = await c.completions.create(model=MODEL, prompt="a b c", max_tokens=3)
            streamed = [x async for x in await c.chat.completions.create(
                model=MODEL, max_tokens=4, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "x y"}])]
        async with anthropic.AsyncAnthropic(base_url=server.root_url, api_key=allowed,
                                            max_retries=0) as a:
            msg = await a.messages.create(model=CLAUDE_MODEL, max_tokens=5, messages=[
                {"role": "user", "content": "hello claude"}])
            async with a.messages.stream(model=CLAUDE_MODEL, max_tokens=6, messages=[
                    {"role": "user", "content": "stream to me please"}]) as s:
                streamed_text = "".join([t async for t in s.text_stream])
                final = await s.get_final_message()
        before = (len(oai.seen), len(claude.seen))
        async with oai_client(server, never) as c:
            with pytest.raises(openai.InternalServerError) as refused:
                await c.chat.completions.create(model=MODEL, max_tokens=4, messages=[
                    {"role": "user", "content": "never leaves"}])
        async with oai_client(server, broke) as c:
            with pytest.raises(openai.InternalServerError) as exhausted:
                await c.chat.completions.create(model=MODEL, max_tokens=400, messages=[
                    {"role": "user", "content": "over budget"}])
        assert (len(oai.seen), len(claude.seen)) == before  # neither left the house
    finally:
        for engine in server.engines.values():
            engine.healthy = True
    assert refused.value.status_code == exhausted.value.status_code == 503
    assert whole.usage.completion_tokens == 3 and whole.choices[0].text.split() == [
        "w0", "w1", "w2"]
    assert streamed[-1].usage.completion_tokens == 4  # asked for: relayed
    assert claude.seen[-2].body["model"] == "claude-sonnet-4.6"
    assert claude.seen[-1].headers["x-api-key"] == ANTHROPIC_KEY
    assert msg.usage.output_tokens == 5 and streamed_text.split() == [f"w{i}" for i in range(6)]
    assert final.usage.input_tokens == 4
    rows = {(r.endpoint, r.stream): r for r in settled(db_url, "t-down-allowed", 4)}
    expected = {("completions", False): ("provider:oai", "gpt-5.4", 3, 3),
                ("chat.completions", True): ("provider:oai", "gpt-5.4", 2, 4),
                ("messages", False): ("provider:claude", "claude-sonnet-4.6", 2, 5),
                ("messages", True): ("provider:claude", "claude-sonnet-4.6", 4, 6)}
    for key, (backend, baseline, prompt, completion) in expected.items():
        r = rows[key]
        assert (r.backend, r.prompt_tokens, r.completion_tokens, r.status_code) == (
            backend, prompt, completion, 200), key
        assert r.cost_usd == pytest.approx(provider_usd(baseline, prompt, completion), abs=1e-9)
    for tenant in ("t-down-never", "t-down-broke"):
        [r] = settled(db_url, tenant, 1)
        assert (r.backend, r.status_code, r.completion_tokens) == ("replica", 503, 0)


async def test_provider_error_keeps_its_status_class_and_bills_nothing(server, providers,
                                                                      db_url):
    oai, _ = providers
    key = new_tenant(server, "t-fail", overflow_policy="allowed", overflow_budget_usd=1.0)
    for engine in server.engines.values():
        engine.healthy = False
    try:
        async with oai_client(server, key) as c:
            oai.fail_next(500)
            with pytest.raises(openai.InternalServerError) as server_side:
                await c.chat.completions.create(model=MODEL, max_tokens=4, messages=[
                    {"role": "user", "content": "fails"}])
            oai.fail_next(429)
            with pytest.raises(openai.RateLimitError):
                await c.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "x"}])
    finally:
        for engine in server.engines.values():
            engine.healthy = True
    assert server_side.value.status_code == 500
    rows = settled(db_url, "t-fail", 2)
    assert sorted(r.status_code for r in rows) == [429, 500]
    for r in rows:
        assert (r.backend, r.prompt_tokens, r.completion_tokens, r.cost_usd) == (
            "provider:oai", 0, 0, 0.0)
        assert OPENAI_KEY not in (r.error_code or "")


async def test_client_leaving_mid_stream_cancels_the_provider_request_and_bills_what_ran(
        server, providers, db_url):
    _, claude = providers
    key = new_tenant(server, "t-leave", overflow_policy="allowed", overflow_budget_usd=1.0)
    claude.token_interval_s = 0.05
    for engine in server.engines.values():
        engine.healthy = False
    cancelled = claude.cancelled
    try:
        async with anthropic.AsyncAnthropic(base_url=server.root_url, api_key=key,
                                            max_retries=0) as a:
            async with a.messages.stream(model=CLAUDE_MODEL, max_tokens=200, messages=[
                    {"role": "user", "content": "a long answer please"}]) as s:
                got = 0
                async for _ in s.text_stream:
                    got += 1
                    if got == 5:
                        break
        deadline = time.monotonic() + 10
        while claude.cancelled == cancelled and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        claude.token_interval_s = 0.0
        for engine in server.engines.values():
            engine.healthy = True
    assert claude.cancelled == cancelled + 1
    [r] = settled(db_url, "t-leave", 1)
    assert (r.backend, r.status_code, r.prompt_tokens) == ("provider:claude", 499, 4)
    assert 5 <= r.completion_tokens < 200
    assert r.cost_usd == pytest.approx(provider_usd("claude-sonnet-4.6", 4, r.completion_tokens),
                                       abs=1e-9)


async def test_wait_past_the_bound_overflows_when_the_queue_cannot_predict_it(server, providers,
                                                                             db_url):
    """No request of the model has ended yet, so the fair queue cannot predict a wait: the
    opted-in request waits at most its bound, then goes to the provider."""
    oai, _ = providers
    allowed = new_tenant(server, "t-bound-allowed", overflow_policy="allowed",
                         overflow_budget_usd=1.0)
    busy = new_tenant(server, "t-bound-never")
    async with oai_client(server, busy) as c_busy, oai_client(server, allowed) as c:
        hogs = [asyncio.create_task(c_busy.chat.completions.create(
            model=FRESH_MODEL, max_tokens=50, messages=[{"role": "user", "content": "hog"}]))
            for _ in range(2)]
        await asyncio.sleep(0.3)  # both slots taken, none ended
        answer = await c.chat.completions.create(model=FRESH_MODEL, max_tokens=3, messages=[
            {"role": "user", "content": "bounded"}])
        hogs_running = not any(h.done() for h in hogs)  # it did not wait for their slots
        await asyncio.gather(*hogs)
    assert answer.usage.completion_tokens == 3
    assert hogs_running
    assert oai.seen[-1].body["model"] == "gpt-5.4"
    [row] = settled(db_url, "t-bound-allowed", 1)
    assert (row.backend, row.status_code) == ("provider:oai", 200)
    assert {r.backend for r in settled(db_url, "t-bound-never", 2)} == {"replica"}


async def test_dashboard_panels_show_blended_cost_share_and_saving_in_a_real_prometheus(
        server, providers, db_url):
    """A real Prometheus scrapes the gateway while requests go to replicas and to a provider:
    its per-backend USD equals the ledger's, and the ops dashboard's overflow panels answer."""
    import json
    import shutil
    from pathlib import Path

    from tests.integration.test_prometheus_cost import GRAFANA_VARS, _Prometheus, _wait_for

    from moestack.testing.stack_process import short_temp_dir

    assert shutil.which("prometheus"), "prometheus is missing: scripts/install.sh installs it"
    prom = _Prometheus(server.operator_url.removeprefix("http://"), short_temp_dir())
    try:
        await asyncio.to_thread(prom.wait_ready)
        await _wait_for(prom, 'up{job="moestack"}', lambda v: list(v.values()) == [1.0])
        await asyncio.sleep(2)  # a few scrapes before the traffic, so rate() sees it
        key = new_tenant(server, "t-prom", overflow_policy="allowed", overflow_budget_usd=1.0)
        async with oai_client(server, key) as c:
            for down in (False, True, False, True):
                for engine in server.engines.values():
                    engine.healthy = not down
                await c.chat.completions.create(model=MODEL, max_tokens=6, messages=[
                    {"role": "user", "content": "count me"}])
        for engine in server.engines.values():
            engine.healthy = True
        rows = settled(db_url, "t-prom", 4)
        assert sorted(r.backend for r in rows) == ["provider:oai"] * 2 + ["replica"] * 2
        store = TenancyStore.open(db_url, migrate=False)
        try:
            every = ledger.query_usage(store)
        finally:
            store.close()
        want = {}
        for r in every:
            want[r.backend] = want.get(r.backend, 0.0) + (r.cost_usd or 0.0)

        def matches(got):
            return {json.loads(k)["backend"]: v for k, v in got.items()} == pytest.approx(
                want, abs=1e-8)
        got = await _wait_for(prom, "sum by (backend) (moestack_backend_cost_usd_total)",
                              matches)
        assert matches(got), (got, want)
        ops = json.loads((Path(__file__).resolve().parents[2] / "monitoring" / "grafana" /
                          "dashboards" / "moestack-ops.json").read_text())
        panels = {p["title"]: p["targets"][0]["expr"] for p in ops["panels"]}
        values = {}
        for title in ("Blended USD per 1M tokens: cluster + overflow APIs",
                      "Share of requests overflowed to external APIs",
                      "Saving vs everything to the API (selected range)"):
            expr = panels[title]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            got = await _wait_for(prom, expr, lambda v: len(v) == 1)
            assert len(got) == 1, (title, got)
            values[title] = list(got.values())[0]
        assert 0 < values["Share of requests overflowed to external APIs"] < 1
        assert values["Blended USD per 1M tokens: cluster + overflow APIs"] > 0
    finally:
        prom.stop()
