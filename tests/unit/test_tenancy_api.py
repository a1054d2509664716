"""Tenancy through the OpenAI API (fake engine, SQLite): keys, ACLs, limits, budgets, ledger."""

import asyncio
import contextlib

import openai
import pytest
import uvicorn

from moestack.metering.pricing import load_pricing
from moestack.scheduling.fair_queue import TIER_SPAN
from moestack.tenancy import query_usage
from moestack.testing import FakeFault, fake_config, fake_model
from moestack.testing.local_api import local_stack

MODEL, OTHER = "fake-moe", "fake-other"
ADMIN_KEY = "admin-secret-of-the-tests-0123456789"  # 32+ characters, as a gateway requires
PRICE = {"usd_per_1m_prompt_tokens": 1_000_000.0, "usd_per_1m_completion_tokens": 2_000_000.0}
"""1 USD per prompt token and 2 USD per completion token: budgets in whole tokens."""


def tenancy_config(tmp_path, **fake):
    return fake_config(fake_model(MODEL, fake=fake), fake_model(OTHER),
                       storage={"url": f"sqlite:///{tmp_path}/t.db"},
                       tenancy={"enabled": True, "prices": {MODEL: PRICE},
                                "auth_cache_ttl_s": 0})


@pytest.fixture
async def stack(tmp_path):
    async with local_stack(tenancy_config(tmp_path)) as s:
        yield s


@contextlib.asynccontextmanager
async def served(config):
    """The local stack behind a real HTTP server on a free port (real streaming and
    disconnects)."""
    async with local_stack(config) as s:
        server = uvicorn.Server(uvicorn.Config(s.app, host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        s.base_url = f"http://127.0.0.1:{port}/v1"
        s.clients = []
        try:
            yield s
        finally:
            for client in s.clients:
                await client.close()
            server.should_exit = True
            await task


@pytest.fixture
async def slow_stack(tmp_path):
    """A slow model, served over HTTP."""
    async with served(tenancy_config(tmp_path, token_interval_s=0.02)) as s:
        yield s


def tcp_client(stack, key):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    stack.clients.append(client)
    return client


async def until(predicate, timeout_s=5.0):
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def tenant(stack, name="acme", **limits):
    _, key = stack.tenancy.store.create_tenant(name, **limits)
    return key.plaintext


async def chat(client, model=MODEL, max_tokens=3, **kw):
    return await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, **kw)


def rows(stack, name=None):
    """The ledger's rows, once the settlements queued so far are written."""
    stack.tenancy.writer.flush()
    return query_usage(stack.tenancy.store, tenant=name)


async def test_valid_key_gets_completion_and_one_ledger_row(stack):
    key = tenant(stack)
    resp = await chat(stack.openai(key))
    [row] = rows(stack, "acme")
    assert resp.id == f"chatcmpl-{row.request_id}" and row.state == "settled" and row.status_code == 200
    # "<|user|> hi <|end|> <|assistant|>" is four fake tokens.
    assert (row.prompt_tokens, row.completion_tokens, row.charged_tokens) == (4, 3, 7)
    assert row.charged_usd == pytest.approx(4 + 2 * 3)  # the tenancy token prices
    # The self-hosted and baseline costs come from the metering cost model and pricing catalog.
    catalog = load_pricing()
    assert row.cost_usd is not None and row.cost_usd > 0
    assert row.baseline_costs_usd == pytest.approx(
        {name: b.usd(4, 0, 3) for name, b in catalog.baselines.items()})
    assert row.key_id == key.split("-")[1] and row.ttft_s is not None


@pytest.mark.parametrize("key", [None, "msk-0123456789abcdef-" + "x" * 43, "garbage"])
async def test_missing_or_unknown_key_is_401(stack, key):
    tenant(stack)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = await stack.http.post("/v1/chat/completions", headers=headers, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert rows(stack) == []


async def test_revoked_key_is_401_and_other_key_still_works(stack):
    key = tenant(stack)
    second = stack.tenancy.store.create_key("acme").plaintext
    stack.tenancy.store.revoke_key(key.split("-")[1])
    with pytest.raises(openai.AuthenticationError):
        await chat(stack.openai(key))
    assert (await chat(stack.openai(second))).usage.completion_tokens == 3


async def test_model_outside_acl_is_404_like_a_model_that_does_not_exist(stack):
    key = tenant(stack, allowed_models=[OTHER])
    with pytest.raises(openai.NotFoundError) as hidden:
        await chat(stack.openai(key))
    with pytest.raises(openai.NotFoundError) as absent:
        await chat(stack.openai(key), model="no-such-model")
    assert hidden.value.body["code"] == absent.value.body["code"] == "model_not_found"
    assert (hidden.value.body["message"].replace(MODEL, "X")
            == absent.value.body["message"].replace("no-such-model", "X"))
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = await stack.http.post(path, headers={"Authorization": f"Bearer {key}"},
                                  json={"model": MODEL, "max_tokens": 2, **body})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", path
    assert (await chat(stack.openai(key), model=OTHER)).usage.completion_tokens == 3
    # The model list shows only the tenant's models; a hidden one reads as missing, as OpenAI's.
    client = stack.openai(key)
    assert [m.id async for m in client.models.list()] == [OTHER]
    assert (await client.models.retrieve(OTHER)).id == OTHER
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve(MODEL)
    everything = stack.openai(tenant(stack, name="all-models"))
    assert sorted([m.id async for m in everything.models.list()]) == sorted([MODEL, OTHER])


async def test_requests_per_minute_limit_is_429_with_retry_after(stack):
    key = tenant(stack, requests_per_min=2)
    client = stack.openai(key)
    await chat(client)
    await chat(client)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(client)
    assert "requests per minute" in err.value.body["message"]
    assert 1 <= int(err.value.response.headers["Retry-After"]) <= 60
    assert len(rows(stack)) == 2


async def test_tokens_per_minute_reserve_max_completion_and_settle_real_count(stack):
    # Reservation: prompt upper bound (bytes + template allowance) + max_tokens; the row is then
    # charged the real 4 + 3 tokens, which frees the rest of the limit.
    key = tenant(stack, tokens_per_min=120)
    client = stack.openai(key)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(client, max_tokens=200)
    assert "tokens per minute" in err.value.body["message"]
    for _ in range(5):
        await chat(client, max_tokens=3)
    assert sum(r.charged_tokens for r in rows(stack)) == 5 * 7


async def test_concurrency_limit_rejects_the_extra_stream(slow_stack):
    key = tenant(slow_stack, max_concurrent_requests=1)
    client = tcp_client(slow_stack, key)
    stream = await chat(client, max_tokens=20, stream=True)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(client)
    assert "concurrent requests" in err.value.body["message"]
    assert err.value.response.headers["Retry-After"] == "1"
    async for _ in stream:
        pass
    await until(lambda: rows(slow_stack)[0].state == "settled")
    await chat(client)  # the slot is free again


async def test_budget_exhausted_is_insufficient_quota(stack):
    # A request reserves its prompt upper bound (2 content bytes + 4 of the role + 2 * 16 template
    # allowance = 38 USD) plus 2 USD per max_tokens, and is charged 4 + 2 * completion tokens.
    key = tenant(stack, budget_usd=60.0, budget_period="day")
    client = stack.openai(key)
    await chat(client, max_tokens=3)  # reserves 44, charged 10 USD
    with pytest.raises(openai.RateLimitError) as err:
        await chat(client, max_tokens=10)  # would reserve 58 USD, more than the 50 left
    assert err.value.body["type"] == "insufficient_quota"
    assert err.value.body["code"] == "insufficient_quota"
    assert "Retry-After" in err.value.response.headers
    assert sum(r.charged_usd for r in rows(stack)) == pytest.approx(10)
    metrics = (await stack.operator.get("/metrics")).text
    assert 'moestack_tenant_budget_remaining_usd{tenant="acme"} 16.0' in metrics  # 60 - 44


async def test_concurrent_streams_cannot_overspend_budget(slow_stack):
    key = tenant(slow_stack, budget_usd=300.0)
    client = tcp_client(slow_stack, key)

    async def one():
        try:
            stream = await chat(client, max_tokens=20, stream=True)
            return len([c async for c in stream])
        except openai.RateLimitError:
            return None

    results = await asyncio.gather(*(one() for _ in range(12)))
    admitted = [r for r in results if r is not None]
    # Each reserves 34 + 20 * 2 = 74 USD and really costs 4 + 40 = 44 USD: without reservation
    # all 12 would start at once (528 USD); with it at most four are in flight at any time.
    assert 0 < len(admitted) < 12
    await until(lambda: all(r.state == "settled" for r in rows(slow_stack)))
    assert sum(r.charged_usd for r in rows(slow_stack)) <= 300.0
    assert all(r.completion_tokens == 20 for r in rows(slow_stack))


async def test_client_disconnect_mid_stream_settles_partial_usage_once(slow_stack):
    key = tenant(slow_stack)
    stream = await chat(tcp_client(slow_stack, key), max_tokens=50, stream=True)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    await until(lambda: rows(slow_stack)[0].state == "settled")
    [row] = rows(slow_stack)
    assert row.status_code == 499 and row.error_code == "client_closed"
    assert 3 <= row.completion_tokens < 50
    assert row.charged_tokens == row.prompt_tokens + row.completion_tokens
    assert slow_stack.engines[MODEL].aborted == [row.request_id]


async def test_client_closing_after_the_last_event_is_a_complete_answer(tmp_path):
    # The openai client closes on `[DONE]`; the engine's end of body comes 0.3 s later.
    async with served(tenancy_config(tmp_path, token_interval_s=0.01,
                                     end_of_body_delay_s=0.3)) as s:
        stream = await chat(tcp_client(s, tenant(s)), max_tokens=5, stream=True)
        chunks = [c async for c in stream]
        await until(lambda: rows(s) and rows(s)[0].state == "settled")
        [row] = rows(s)
        assert len(chunks) == 5
        assert (row.status_code, row.error_code, row.completion_tokens) == (200, None, 5)


async def test_engine_failure_mid_stream_is_settled_with_tokens_made(slow_stack):
    key = tenant(slow_stack)
    slow_stack.engines[MODEL].fault = FakeFault(after_tokens=4)
    stream = await chat(tcp_client(slow_stack, key), max_tokens=20, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await until(lambda: rows(slow_stack)[0].state == "settled")
    [row] = rows(slow_stack)
    assert (row.state, row.status_code, row.completion_tokens) == ("settled", 503, 4)


async def test_engine_rejection_releases_reservation(stack):
    key = tenant(stack, max_concurrent_requests=1)
    with pytest.raises(openai.BadRequestError):
        await chat(stack.openai(key), max_tokens=10_000)
    [row] = rows(stack)
    assert (row.status_code, row.charged_tokens, row.charged_usd) == (400, 0, 0.0)
    await chat(stack.openai(key))


async def test_priority_tier_reaches_the_engine(stack):
    key = tenant(stack, priority=3)
    await chat(stack.openai(key))
    # Dynamic priority: the tier dominates (tier x TIER_SPAN), plus the tenant's rank (0 alone).
    assert stack.engines[MODEL].requests_seen[-1].priority == 3 * TIER_SPAN


async def test_tenant_reads_only_its_own_usage(stack):
    a, b = tenant(stack, "a"), tenant(stack, "b")
    await chat(stack.openai(a))
    await chat(stack.openai(b))
    await chat(stack.openai(b))
    stack.tenancy.writer.flush()
    r = await stack.http.get("/v1/usage", headers={"Authorization": f"Bearer {a}"})
    assert r.status_code == 200
    body = r.json()
    assert body["tenant"] == "a" and body["totals"]["requests"] == 1
    assert body["totals"]["completion_tokens"] == 3
    # Tokens and charges only: never the operator's self-hosted cost or baseline prices.
    assert "cost_usd" not in r.text and "baseline" not in r.text
    r = await stack.operator.get("/admin/v1/usage", headers={"Authorization": f"Bearer {a}"})
    assert r.status_code in (401, 403)


async def test_admin_api_manages_tenants_with_admin_key_only(stack, monkeypatch):
    r = await stack.operator.get("/admin/v1/tenants")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await stack.operator.get("/admin/v1/tenants",
                                 headers={"Authorization": "Bearer wrong"})).status_code == 401
    r = await stack.operator.post("/admin/v1/tenants", headers=admin,
                              json={"name": "team-x", "requests_per_min": 1, "weight": 2,
                                    "allowed_models": ["*"]})
    assert r.status_code == 201
    key = r.json()["api_key"]
    assert key not in (await stack.operator.get("/admin/v1/tenants", headers=admin)).text
    await chat(stack.openai(key))
    with pytest.raises(openai.RateLimitError):
        await chat(stack.openai(key))
    r = await stack.operator.patch("/admin/v1/tenants/team-x", headers=admin,
                               json={"requests_per_min": None})
    assert r.json()["requests_per_min"] is None and r.json()["weight"] == 2
    await chat(stack.openai(key))
    key_id = r.json()["active_key_ids"][0]
    assert (await stack.operator.delete(f"/admin/v1/keys/{key_id}", headers=admin)).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await chat(stack.openai(key))
    r = await stack.operator.get("/admin/v1/usage?tenant=team-x&since=1h", headers=admin)
    assert len(r.json()["data"]) == 2
    stack.tenancy.writer.flush()
    r = await stack.operator.get("/admin/v1/usage/hourly?tenant=team-x", headers=admin)
    [hour] = r.json()["data"]
    assert hour["requests"] == 2 and "cost_usd" in hour and "baseline_costs_usd" in hour
    r = await stack.operator.get("/admin/v1/usage?since=99999999999d", headers=admin)
    assert r.status_code == 400
    dup = await stack.operator.post("/admin/v1/tenants", headers=admin,
                                    json={"name": "team-x", "allowed_models": ["*"]})
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "tenant_exists"


async def test_admin_api_and_metrics_are_not_on_the_public_app(stack, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for path in ("/admin/v1/tenants", "/metrics", "/docs", "/openapi.json"):
        assert (await stack.http.get(path, headers=admin)).status_code == 404, path
    assert (await stack.operator.get("/admin/v1/tenants", headers=admin)).status_code == 200
    assert (await stack.operator.get("/metrics")).status_code == 200


async def test_models_list_needs_a_key(stack):
    assert (await stack.http.get("/v1/models")).status_code == 401
    key = tenant(stack)
    r = await stack.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200


async def test_client_gone_while_queued_releases_its_reservation(tmp_path):
    config = fake_config(fake_model(MODEL, fake={"token_interval_s": 0.02}),
                         storage={"url": f"sqlite:///{tmp_path}/t.db"},
                         tenancy={"enabled": True,
                                  "fair_queue": {"max_inflight_requests_per_model": 1}})
    async with local_stack(config) as stack:
        key = tenant(stack)
        running = asyncio.create_task(chat(stack.openai(key), max_tokens=20))
        await until(lambda: stack.scheduler.queue(MODEL).inflight == 1)
        queued = asyncio.create_task(chat(stack.openai(key), max_tokens=20))
        await until(lambda: stack.scheduler.queue(MODEL).waiting() == 1)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await running
        await until(lambda: all(r.state == "settled" for r in rows(stack)))
        by_status = sorted((r.status_code, r.charged_tokens) for r in rows(stack))
    assert by_status == [(200, 24), (499, 0)]


async def test_refusals_are_counted_per_tenant_and_status(stack):
    key = tenant(stack, allowed_models=[OTHER], requests_per_min=1)
    for model in (MODEL, OTHER, OTHER):
        try:
            await chat(stack.openai(key), model=model)
        except openai.APIStatusError:
            pass
    with pytest.raises(openai.AuthenticationError):
        await chat(stack.openai("wrong"))
    text = (await stack.operator.get("/metrics")).text
    for tenant_name, status in (("acme", 404), ("acme", 429), ("unknown", 401)):
        assert (f'moestack_tenant_rejections_total{{status="{status}",tenant="{tenant_name}"}} '
                "1.0") in text
