"""The tenancy store on SQLite and a real PostgreSQL server: migrations, shared limits, crashes."""

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from moestack.api.relay import REQUEST_ID_HEADER
from moestack.usage import RequestRecord
from moestack.errors import InsufficientQuotaError, RateLimitError
from moestack.tenancy import ledger, query_usage
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.store import TenancyStore
from moestack.testing.postgres import PostgresUnavailable, postgres_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    try:
        with postgres_server(tmp_path_factory.mktemp("pg")) as pg:
            yield pg
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/tenancy.db"
    return request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def replicas(url):
    """``replicas(n)``: n independent stores on one database, like n gateway replicas."""
    opened = []

    def make(n):
        stores = [TenancyStore.open(url) for _ in range(n)]
        opened.extend(stores)
        return stores
    yield make
    for s in opened:
        s.close()


def admit_many(stores, principal, count, tokens=10, usd=0.0):
    """Admit ``count`` requests at once from threads spread over ``stores``; returns outcomes."""
    outcomes, barrier = [None] * count, threading.Barrier(count)

    def one(i):
        barrier.wait()
        try:
            admit(stores[i % len(stores)], principal,
                  reservation=Reservation(f"req-{i}", tokens, usd), model="m",
                  endpoint="chat.completions", stream=True, gateway_id=f"gw{i % len(stores)}",
                  lease_s=60)
            outcomes[i] = "ok"
        except RateLimitError as exc:
            outcomes[i] = type(exc).__name__
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def record(request_id, prompt=3, completion=5, status=200):
    return RequestRecord(request_id=request_id, model="m", endpoint="chat.completions",
                         stream=True, status_code=status, prompt_tokens=prompt,
                         completion_tokens=completion, cached_prompt_tokens=0, ttft_s=0.01,
                         e2e_s=0.1)


def close_lost(store):
    with store.begin() as conn:
        return ledger.close_lost(conn)


def test_migrations_are_idempotent_and_safe_from_replicas_at_once(url):
    stores = [TenancyStore(url) for _ in range(3)]
    threads = [threading.Thread(target=s.migrate) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stores[0].migrate()
    stores[0].create_tenant("a")
    assert [t.name for t in stores[1].list_tenants()] == ["a"]
    for s in stores:
        s.close()


@pytest.mark.parametrize("limit,expected_error", [
    ({"max_concurrent_requests": 3}, "RateLimitError"),
    ({"requests_per_min": 4}, "RateLimitError"),
    ({"tokens_per_min": 55}, "RateLimitError"),
    ({"budget_usd": 0.5}, "InsufficientQuotaError"),
])
def test_limits_hold_across_replicas_admitting_at_once(url, replicas, limit, expected_error):
    stores = replicas(3)
    _, key = stores[0].create_tenant("t", **limit)
    principal = authenticate(stores[1], key.plaintext)
    outcomes = admit_many(stores, principal, 16, tokens=10, usd=0.1)
    allowed = {"max_concurrent_requests": 3, "requests_per_min": 4, "tokens_per_min": 5,
               "budget_usd": 5}[next(iter(limit))]
    assert outcomes.count("ok") == allowed
    assert set(outcomes) == {"ok", expected_error}
    assert len(query_usage(stores[2], tenant="t")) == allowed


def test_settle_is_idempotent_and_frees_the_reservation(url, replicas):
    a, b = replicas(2)
    _, key = a.create_tenant("t", tokens_per_min=100)
    principal = authenticate(a, key.plaintext)
    admit(a, principal, reservation=Reservation("r1", 90, 0.0), model="m",
          endpoint="chat.completions", stream=True, gateway_id="gw-a", lease_s=60)
    with pytest.raises(RateLimitError):
        admit(b, principal, reservation=Reservation("r2", 90, 0.0), model="m",
              endpoint="chat.completions", stream=True, gateway_id="gw-b", lease_s=60)
    assert ledger.settle(a, record("r1"), charged_usd=0.01)
    assert not ledger.settle(b, record("r1", completion=50), charged_usd=9.0)  # a retry: no effect
    [row] = query_usage(b, tenant="t")
    assert (row.state, row.charged_tokens, row.charged_usd) == ("settled", 8, 0.01)
    admit(b, principal, reservation=Reservation("r2", 90, 0.0), model="m",
          endpoint="chat.completions", stream=True, gateway_id="gw-b", lease_s=60)


def test_budget_period_only_counts_the_current_period(url, replicas):
    [s] = replicas(1)
    _, key = s.create_tenant("t", budget_usd=1.0, budget_period="day")
    p = authenticate(s, key.plaintext)
    yesterday = ledger.utcnow() - dt.timedelta(days=1)
    admit(s, p, reservation=Reservation("old", 1, 1.0), model="m", endpoint="x", stream=False,
          gateway_id="g", lease_s=60, now=yesterday)
    admit(s, p, reservation=Reservation("new", 1, 0.6), model="m", endpoint="x", stream=False,
          gateway_id="g", lease_s=60)
    with pytest.raises(InsufficientQuotaError):
        admit(s, p, reservation=Reservation("more", 1, 0.6), model="m", endpoint="x",
              stream=False, gateway_id="g", lease_s=60)


KILLED_GATEWAY = r'''
import os, signal, sys
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.store import TenancyStore
store = TenancyStore.open(sys.argv[1])
p = authenticate(store, sys.argv[2])
admit(store, p, reservation=Reservation("doomed", 40, 0.4), model="m", endpoint="x",
      stream=True, gateway_id="gw-killed", lease_s=float(sys.argv[3]))
print("admitted", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_killed_gateway_leaves_one_row_closed_as_lost_with_its_reservation(url, replicas):
    [s] = replicas(1)
    _, key = s.create_tenant("t", max_concurrent_requests=1, budget_usd=1.0)
    proc = subprocess.run([sys.executable, "-c", KILLED_GATEWAY, url, key.plaintext, "1.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "admitted" in proc.stdout
    [row] = query_usage(s, tenant="t")
    assert row.state == "pending"
    p = authenticate(s, key.plaintext)
    with pytest.raises(RateLimitError):  # still in flight as far as anyone knows
        admit(s, p, reservation=Reservation("next", 1, 0.0), model="m", endpoint="x",
              stream=False, gateway_id="g", lease_s=60)
    time.sleep(1.2)
    assert close_lost(s) == 1 and close_lost(s) == 0
    [row] = query_usage(s, tenant="t")
    assert (row.state, row.error_code, row.charged_usd) == ("lost", "gateway_lost", 0.4)
    admit(s, p, reservation=Reservation("next", 1, 0.5), model="m", endpoint="x",
          stream=False, gateway_id="g", lease_s=60)  # concurrency freed, 0.4 + 0.5 <= 1 USD
    assert len(query_usage(s, tenant="t")) == 2


GATEWAY = r'''
import asyncio, sys, uvicorn
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack
config = fake_config(fake_model("m", fake={"token_interval_s": 0.05}),
                     storage={"url": sys.argv[1]}, tenancy={"enabled": True, "lease_s": 1.0})
async def main():
    async with local_stack(config) as s:
        await uvicorn.Server(uvicorn.Config(s.app, host="127.0.0.1", port=int(sys.argv[2]),
                                            log_level="warning", lifespan="off")).serve()
asyncio.run(main())
'''


def test_gateway_killed_mid_stream_leaves_exactly_one_row(url, replicas):
    import httpx

    from moestack.testing.stack_process import free_port

    [s] = replicas(1)
    _, key = s.create_tenant("t", max_concurrent_requests=1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", GATEWAY, url, str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": "m", "prompt": "hello", "max_tokens": 200, "stream": True}
        headers = {"Authorization": f"Bearer {key.plaintext}"}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers,
                          timeout=30) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        [row] = query_usage(s, tenant="t")
        assert row.state == "pending"
        time.sleep(1.2)  # the lease runs out: nobody renews it any more
        assert close_lost(s) == 1
        [row] = query_usage(s, tenant="t")
        # The reservation stays charged: prompt upper bound (5 bytes + 1) + max_tokens.
        assert (row.state, row.charged_tokens) == ("lost", 5 + 1 + 200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_migration_from_0001_converts_existing_rows(url):
    from tests.unit.test_tenancy_counters import check_migrated, make_v1_database

    make_v1_database(url)
    check_migrated(url)


def test_counters_equal_the_ledger_after_concurrent_replicas(url, replicas):
    from tests.unit.test_tenancy_counters import actual_counters, expected_counters

    stores = replicas(4)
    _, key = stores[0].create_tenant("t", budget_usd=1.0)
    principal = authenticate(stores[1], key.plaintext)
    outcomes = admit_many(stores, principal, 24, tokens=10, usd=0.1)
    assert outcomes.count("ok") == 10  # 10 x 0.1 USD fill the budget exactly, never more
    for i, outcome in enumerate(outcomes):
        if outcome == "ok" and i % 2:
            ledger.settle(stores[i % 4], record(f"req-{i}"), charged_usd=0.03)
    now = ledger.utcnow()
    assert actual_counters(stores[0], principal.tenant_id, now) == \
        expected_counters(stores[0], "t", now)


async def test_postgres_stopped_and_restarted_gives_503_then_recovers_and_settles_once(postgres):
    import asyncio

    from moestack.testing import fake_config, fake_model
    from moestack.testing.local_api import local_stack

    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    config = fake_config(fake_model("m", fake={"token_interval_s": 0.05}),
                         storage={"url": url, "busy_timeout_s": 1.0},
                         tenancy={"enabled": True, "auth_cache_ttl_s": 30,
                                  "prices": {"m": {"usd_per_1m_prompt_tokens": 1e6,
                                                   "usd_per_1m_completion_tokens": 1e6}}})
    async with local_stack(config) as stack:
        store = stack.tenancy.store
        _, key = store.create_tenant("t", budget_usd=10_000.0)
        headers = {"Authorization": f"Bearer {key.plaintext}"}

        async def chat(max_tokens=3):
            started = time.monotonic()
            r = await stack.http.post("/v1/chat/completions", headers=headers, json={
                "model": "m", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}]})
            return r, time.monotonic() - started

        assert (await chat())[0].status_code == 200
        running = asyncio.create_task(chat(max_tokens=40))  # about 2 s of tokens
        await asyncio.sleep(0.5)
        postgres.pause()
        try:
            for _ in range(3):
                r, elapsed = await chat()
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "service_unavailable"
                assert int(r.headers["Retry-After"]) >= 1 and elapsed < 3.0, elapsed
                assert "Traceback" not in r.text and "psycopg2" not in r.text
            assert (await stack.http.get("/ready")).status_code == 503
            served, _ = await running  # it was admitted before the outage: it completes
            assert served.status_code == 200
            await asyncio.sleep(0.3)
            assert stack.tenancy.writer.pending() >= 1  # its settlement waits for the store
        finally:
            postgres.resume()
        for _ in range(50):  # recovers by itself: no restart of the gateway
            r, _ = await chat()
            if r.status_code == 200:
                break
            await asyncio.sleep(0.2)
        assert r.status_code == 200
        assert (await stack.http.get("/ready")).status_code == 200
        stack.tenancy.writer.flush(timeout_s=10)
        rows = query_usage(store, tenant="t")
        by_id = {row.request_id: row for row in rows}
        assert by_id[served.headers[REQUEST_ID_HEADER]].completion_tokens == 40
        settled = [row for row in rows if row.state == "settled" and row.status_code == 200]
        # The refused requests' rows (if a commit raced the outage) are released, never billed.
        assert len(settled) == 3
        assert all(row.charged_usd == 0 for row in rows if row.status_code != 200)
        with store.read() as conn:
            inflight, total = conn.exec_driver_sql(
                "SELECT inflight, total_nusd FROM tenant_counters").one()
        assert inflight == 0
        assert total == sum(round(row.charged_usd * 1e9) for row in rows)


def test_batched_writes_keep_every_value_exactly_whatever_the_text(url):
    """The writer's batches go to the driver directly (one query string per phase on
    PostgreSQL): ids, models and adapters with quotes, percent signs, semicolons, backslashes and
    non-ASCII text, and NULL and non-NULL figures side by side, are stored exactly, and the
    counters and rollups still equal the ledger."""
    import asyncio

    from moestack.tenancy import admission, rollups
    from moestack.tenancy.admission import Admission
    from moestack.tenancy.ledger import Settlement
    from moestack.tenancy.writer import StoreWriter
    from tests.unit.test_tenancy_counters import actual_counters, expected_counters

    store = TenancyStore.open(url)
    _, key = store.create_tenant("t", budget_usd=100.0, requests_per_min=1000,
                                 tokens_per_min=10**6, max_concurrent_requests=100)
    p = authenticate(store, key.plaintext)
    texts = ["plain", "it's", "100%", "%s", "%(id)s", "a;b", "back\\slash", "ünï ✓", "$1"]
    models = ["m", "m'; DROP TABLE usage_ledger; --", "m%"]

    async def run():
        loop = asyncio.get_running_loop()
        writer = StoreWriter(store, flush_interval_s=0.05)
        admitted = await asyncio.gather(*(writer.submit_batched(
            admission.admit_many, Admission(p, Reservation(f"r-{t}", 20 + i, 0.001 * (i + 1)),
                                            models[i % 3], "chat.completions", bool(i % 2),
                                            "gw'1", 60), p.tenant_id, deferred=False,
            loop=loop) for i, t in enumerate(texts)))
        settled = [writer.submit_batched(ledger.settle_many, Settlement(
            RequestRecord(request_id=f"r-{t}", model=models[i % 3], endpoint="chat.completions",
                          stream=bool(i % 2), status_code=None if i == 1 else 200,
                          prompt_tokens=i, completion_tokens=2 * i, cached_prompt_tokens=i // 2,
                          ttft_s=None if i % 3 == 0 else 0.25 * i, e2e_s=0.5 + i,
                          error_code=None if i % 2 else t, adapter=None if i % 4 else t),
            0.0001 * i, None if i % 2 else 0.00002 * i,
            None if i % 3 == 1 else {"gpt'4": 0.0003 * i, "ü%": 0.1}), p.tenant_id)
            for i, t in enumerate(texts)]
        # a second admission of the same id in a batch with settlements is refused alone
        again = writer.submit_batched(admission.admit_many, Admission(
            p, Reservation("r-it's", 1, 0.0), "m", "chat.completions", True, "g", 60),
            p.tenant_id, deferred=False, loop=loop)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in settled), again,
                                       return_exceptions=True)
        writer.stop()
        return admitted, results

    admitted, results = asyncio.run(run())
    assert all(isinstance(r, float) for r in admitted)
    assert results[:-1] == [True] * len(texts)
    assert getattr(results[-1], "code", None) == "duplicate_request_id"
    rows = {r.request_id: r for r in ledger.query_usage(store, tenant="t")}
    assert sorted(rows) == sorted(f"r-{t}" for t in texts)
    for i, t in enumerate(texts):
        r = rows[f"r-{t}"]
        assert (r.model, r.stream, r.state, r.status_code, r.error_code, r.adapter) == (
            models[i % 3], bool(i % 2), "settled", None if i == 1 else 200,
            None if i % 2 else t, None if i % 4 else t)
        assert (r.prompt_tokens, r.completion_tokens, r.cached_prompt_tokens,
                r.charged_tokens) == (i, 2 * i, i // 2, 3 * i)
        assert r.charged_usd == pytest.approx(0.0001 * i, abs=1e-12)
        assert r.cost_usd == (None if i % 2 else pytest.approx(0.00002 * i, abs=1e-12))
        assert r.baseline_costs_usd == (None if i % 3 == 1 else {
            "gpt'4": pytest.approx(0.0003 * i, abs=1e-12), "ü%": pytest.approx(0.1)})
        assert (r.ttft_s, r.e2e_s) == (None if i % 3 == 0 else 0.25 * i, 0.5 + i)
    now = ledger.utcnow()
    assert actual_counters(store, p.tenant_id, now) == expected_counters(store, "t", now)
    assert actual_counters(store, p.tenant_id, now)["inflight"] == 0
    assert rollups.query(store) == rollups.aggregate(ledger.query_usage(store))
    store.close()
