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
    assert ledger.close_lost(s) == 1 and ledger.close_lost(s) == 0
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
        assert ledger.close_lost(s) == 1
        [row] = query_usage(s, tenant="t")
        # The reservation stays charged: prompt upper bound (5 bytes + 1) + max_tokens.
        assert (row.state, row.charged_tokens) == ("lost", 5 + 1 + 200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
