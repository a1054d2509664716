"""What an unauthenticated or hostile client can make the gateway do: bounded headers (431),
``/ready`` costs one store probe however many call it, random keys cost no store read each and
are throttled per address, and no engine internals reach a tenant.

Fake engine, SQLite, real uvicorn servers on 127.0.0.1 where sockets matter.
"""

import asyncio
import logging
import secrets
import socket
import time

import httpx
import pytest
import uvicorn.config

from moestack.api.readiness import StoreProbe
from moestack.engine.asgi import serve_asgi
from moestack.engine.protocol import EngineInfo
from moestack.errors import EngineUnavailableError, StoreUnavailableError
from moestack.serve.http_limits import (
    PROTOCOL_IMPORT_PATH,
    HeadBoundedHttpToolsProtocol,
    serve_http_middlewares,
)
from moestack.tenancy.auth_cache import AuthCache
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.throttle import FailedAuthThrottle
from moestack.testing import fake_config, fake_model
from moestack.testing.gateway_server import serve_gateway
from moestack.testing.local_api import local_stack
from moestack.testing.requests import completion

MODEL = "fake-moe"
ADMIN_KEY = "public-surface-test-admin-key-0123456789"


def tenancy_config(tmp_path, **tenancy):
    return fake_config(fake_model(MODEL), storage={"url": f"sqlite:///{tmp_path}/t.db"},
                       tenancy={"enabled": True, **tenancy})


def random_key() -> str:
    return f"msk-{secrets.token_hex(8)}-{secrets.token_urlsafe(32)}"


# -- finding 9: header limits ----------------------------------------------------------------

def send_head(port: int, header_bytes: int, path: str = "/v1/models") -> tuple[int, bytes]:
    """Send a request whose one header holds ``header_bytes``; (bytes sent, answer)."""
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Filler: ".encode())
        chunk = b"a" * 65536
        try:
            while sent < header_bytes:
                sock.sendall(chunk[:header_bytes - sent])
                sent += min(len(chunk), header_bytes - sent)
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading and closed
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except (ConnectionResetError, socket.timeout):
            pass
    return sent, answer


@pytest.fixture
def bounded_auto_protocol(monkeypatch):
    """What Ray Serve's proxy process does with moestack's callback: uvicorn's ``auto`` becomes
    the bounded protocol (restored after the test)."""
    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto",
                        uvicorn.config.HTTP_PROTOCOLS["auto"])
    middlewares = serve_http_middlewares()
    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == PROTOCOL_IMPORT_PATH
    return middlewares


def test_an_8_mb_header_gets_431_on_the_public_and_operator_ports_not_read_whole(
        tmp_path, monkeypatch, bounded_auto_protocol):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    with serve_gateway(tenancy_config(tmp_path), http="auto") as srv:
        assert srv.server.config.http_protocol_class is HeadBoundedHttpToolsProtocol
        for port in (srv.port, srv.operator_port):
            sent, answer = send_head(port, 8 << 20)
            assert answer.startswith(b"HTTP/1.1 431 "), (port, answer[:200])
            assert b'"code": "header_too_large"' in answer
            assert sent < 8 << 20  # it stopped reading long before the end
        # A 40 KiB head that arrives in one read is refused by the middleware instead.
        for port in (srv.port, srv.operator_port):
            _, answer = send_head(port, 40 << 10, path="/health")
            assert answer.startswith(b"HTTP/1.1 431 "), (port, answer[:200])
        # Ordinary heads pass: 12 KiB of headers in all.
        r = httpx.get(f"{srv.root_url}/health", headers={f"x-h{i}": "v" * 1000
                                                         for i in range(12)})
        assert r.status_code == 200


def test_the_proxy_callback_returns_the_header_middleware(bounded_auto_protocol):
    from moestack.api.header_limit import HeaderLimitMiddleware

    assert [m.cls for m in bounded_auto_protocol] == [HeaderLimitMiddleware]


async def test_header_section_over_16_kib_is_431_before_auth_on_the_asgi_app(tmp_path):
    async with local_stack(tenancy_config(tmp_path)) as stack:
        r = await stack.http.get("/v1/models", headers={f"x-h{i}": "v" * 1000
                                                        for i in range(17)})
        assert r.status_code == 431 and r.json()["error"]["code"] == "header_too_large"
        assert r.json()["error"]["param"] is None
        r = await stack.http.get("/v1/models", headers={f"x-h{i}": "v" * 1000
                                                        for i in range(14)})
        assert r.status_code == 401


# -- finding 5: /ready ------------------------------------------------------------------------

async def test_300_concurrent_ready_calls_cost_one_store_probe(tmp_path, monkeypatch):
    async with local_stack(tenancy_config(tmp_path)) as stack:
        store = stack.tenancy.store
        writes = []
        check = store.check_writable
        monkeypatch.setattr(store, "check_writable", lambda: (writes.append(1), check())[1])
        answers = await asyncio.gather(*(stack.http.get("/ready") for _ in range(300)))
        assert {r.status_code for r in answers} == {200}
        assert len(writes) == 1  # one probe write for all 300


class CountingStore:
    def __init__(self, fail: bool = False):
        self.fail, self.writes = fail, 0

    def check_writable(self):
        self.writes += 1
        time.sleep(0.05)  # concurrent callers arrive while it runs
        if self.fail:
            raise StoreUnavailableError("down")


async def test_a_passed_probe_answers_for_its_max_age_and_a_failed_one_is_not_kept():
    now = [0.0]
    store = CountingStore()
    probe = StoreProbe(store, max_age_s=1.0, clock=lambda: now[0])
    results = await asyncio.gather(*(probe.readiness() for _ in range(50)))
    assert all(r.ready for r in results) and store.writes == 1
    now[0] = 0.9
    assert (await probe.readiness()).ready and store.writes == 1
    now[0] = 1.1
    store.fail = True
    results = await asyncio.gather(*(probe.readiness() for _ in range(50)))
    assert not any(r.ready for r in results) and store.writes == 2  # one probe for all 50
    store.fail = False
    assert (await probe.readiness()).ready and store.writes == 3  # recovery shows at once


# -- finding 10: random keys and failed logins -------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


async def test_unknown_key_ids_cost_one_read_each_and_never_evict_known_keys(store):
    _, good = store.create_tenant("acme")
    cache = AuthCache(store, ttl_s=60, max_entries=2, max_unknown_entries=50)
    assert (await cache.principal(good.plaintext)).tenant == "acme"
    reads = cache.store_reads
    unknown = [random_key() for _ in range(200)]
    for key in unknown:
        with pytest.raises(Exception, match="Incorrect API key"):
            await cache.principal(key)
    assert cache.store_reads == reads + 200
    assert (await cache.principal(good.plaintext)).tenant == "acme"
    assert cache.store_reads == reads + 200  # the known key is still held: no read
    with pytest.raises(Exception, match="Incorrect API key"):
        await cache.principal(unknown[-1])  # remembered as unknown: no read
    assert cache.store_reads == reads + 200 and len(cache) == 1


async def test_concurrent_requests_with_one_new_key_share_one_store_read(store):
    _, good = store.create_tenant("acme")
    cache = AuthCache(store, ttl_s=60)
    principals = await asyncio.gather(*(cache.principal(good.plaintext) for _ in range(20)))
    assert {p.tenant for p in principals} == {"acme"} and cache.store_reads == 1


async def test_failed_logins_from_one_address_get_429_and_cost_no_store_read(tmp_path):
    config = tenancy_config(tmp_path, auth_max_failures=3, auth_window_s=30,
                            auth_cache_ttl_s=60)
    async with local_stack(config) as stack:
        _, known = stack.tenancy.store.create_tenant("known")
        _, fresh = stack.tenancy.store.create_tenant("fresh")
        auth = stack.tenancy.auth
        ok = await stack.http.get("/v1/models", headers={"Authorization":
                                                         f"Bearer {known.plaintext}"})
        assert ok.status_code == 200
        statuses = [(await stack.http.get("/v1/models", headers={
            "Authorization": f"Bearer {random_key()}"})).status_code for _ in range(3)]
        assert statuses == [401] * 3
        reads = auth.store_reads
        for headers in ({"Authorization": f"Bearer {random_key()}"}, {}):
            r = await stack.http.get("/v1/models", headers=headers)
            assert r.status_code == 429 and r.json()["error"]["code"] == "auth_throttled"
            assert 1 <= int(r.headers["Retry-After"]) <= 30
        assert auth.store_reads == reads  # refused before any lookup
        # A key the gateway holds as valid still works from that address (a NAT or a proxy
        # shares it); one it would have to look up waits like the guesses.
        r = await stack.http.get("/v1/models", headers={"Authorization":
                                                        f"Bearer {known.plaintext}"})
        assert r.status_code == 200
        r = await stack.http.get("/v1/models", headers={"Authorization":
                                                        f"Bearer {fresh.plaintext}"})
        assert r.status_code == 429


async def test_a_valid_request_does_not_reset_an_addresss_failures(store):
    _, good = store.create_tenant("acme")
    throttle = FailedAuthThrottle(max_failures=2, window_s=60)
    cache = AuthCache(store, ttl_s=60, throttle=throttle)
    for _ in range(2):
        with pytest.raises(Exception, match="Incorrect API key"):
            await cache.principal(random_key(), "10.0.0.9")
        await cache.principal(good.plaintext, "10.0.0.9")  # cached: allowed, resets nothing
    with pytest.raises(Exception, match="Too many failed authentications") as err:
        await cache.principal(random_key(), "10.0.0.9")
    assert err.value.status_code == 429
    with pytest.raises(Exception, match="Incorrect API key"):  # another address: 401
        await cache.principal(random_key(), "10.0.0.10")


# -- finding 12: no engine internals to tenants -------------------------------------------------

SECRET_DETAIL = "Traceback /srv/models/internal-path.py token=sk-live-abc"


async def app_500(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": SECRET_DETAIL.encode()})


async def app_crash(scope, receive, send):
    raise RuntimeError(SECRET_DETAIL)


@pytest.mark.parametrize("app", [app_500, app_crash])
async def test_an_engine_failure_tells_the_tenant_only_the_request_id(app, caplog):
    caplog.set_level(logging.ERROR, logger="moestack.engine.asgi")
    request = completion("a b", 2, request_id="req-1234")
    with pytest.raises(EngineUnavailableError) as err:
        [c async for c in serve_asgi(app, request)]
    assert "req-1234" in err.value.message and SECRET_DETAIL not in err.value.message
    assert err.value.to_openai()["error"]["type"]  # OpenAI-shaped
    assert "req-1234" in caplog.text and SECRET_DETAIL in caplog.text  # the operator's log


class FailingHealthEngine:
    """An engine whose health probe fails with internals in its message."""

    info = EngineInfo(model=MODEL, max_model_len=256, architecture="x")

    async def check_health(self):
        raise EngineUnavailableError(f"engine unhealthy: {SECRET_DETAIL}")


async def test_public_health_names_unhealthy_models_without_their_errors(caplog):
    from moestack.api.app import build_api
    from moestack.api.backend import LocalBackend

    caplog.set_level(logging.WARNING, logger="moestack.api.app")
    app = build_api(fake_config(fake_model(MODEL)), LocalBackend({MODEL: FailingHealthEngine()}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        r = await http.get("/health")
    assert r.status_code == 503
    assert r.json() == {"status": "unhealthy", "models": {MODEL: "unavailable"}}
    assert SECRET_DETAIL in caplog.text


def test_every_ray_pod_of_the_chart_puts_the_header_limits_on_serves_http_servers():
    from moestack.serve.http_limits import PROXY_CALLBACK_ENV
    from tests.unit.test_helm_chart import container, ray_cluster, render

    docs = render()
    pods = [ray_cluster(docs)["headGroupSpec"]["template"],
            *(g["template"] for g in ray_cluster(docs)["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        assert PROXY_CALLBACK_ENV.items() <= env.items()
