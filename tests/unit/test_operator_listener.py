"""The operator listener (admin API, /metrics) over real sockets, and the credential header cap.

Real uvicorn servers on 127.0.0.1; the gateway app over the fake engine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from moestack.api.operator import build_operator_api
from moestack.errors import ConfigError
from moestack.serve.operator_listener import OperatorListener
from moestack.tenancy.throttle import FailedAuthThrottle
from moestack.testing import fake_config, fake_model
from moestack.testing.gateway_server import serve_gateway
from moestack.testing.stack_process import free_port

ADMIN_KEY = "operator-listener-test-admin-key-0123456789"


def tenancy_config(tmp_path, **tenancy):
    return fake_config(fake_model("fake-moe"), tenancy={"enabled": True, **tenancy},
                       storage={"url": f"sqlite:///{tmp_path}/t.db"})


def test_public_port_serves_no_admin_or_metrics_and_the_operator_port_does(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with serve_gateway(tenancy_config(tmp_path)) as srv:
        for path in ("/admin/v1/tenants", "/metrics", "/docs", "/openapi.json"):
            assert httpx.get(srv.root_url + path, headers=admin).status_code == 404, path
        r = httpx.post(srv.operator_url + "/admin/v1/tenants", headers=admin,
                       json={"name": "acme", "allowed_models": ["*"]})
        assert r.status_code == 201
        key = r.json()["api_key"]
        r = httpx.post(srv.base_url + "/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "fake-moe", "prompt": "a b", "max_tokens": 2})
        assert r.status_code == 200
        text = httpx.get(srv.operator_url + "/metrics").text
        assert 'tenant="acme"' in text
        # The tenant's key opens nothing on the operator port.
        r = httpx.get(srv.operator_url + "/admin/v1/tenants",
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401


def test_should_refuse_to_start_with_an_admin_key_under_32_characters(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", "k" * 31)
    config = tenancy_config(tmp_path)
    with pytest.raises(ConfigError, match="has 31 characters; it needs at least 32") as err:
        build_operator_api(config, None, object())
    assert "k" * 31 not in str(err.value)
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", "k" * 32)
    build_operator_api(config, None, object())


def test_throttles_repeated_failed_admin_auth_with_429_and_retry_after(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    config = tenancy_config(tmp_path, admin_auth_max_failures=3, admin_auth_window_s=30)
    with serve_gateway(config) as srv:
        url = srv.operator_url + "/admin/v1/tenants"
        wrong = {"Authorization": "Bearer wrong-guess"}
        assert [httpx.get(url, headers=wrong).status_code for _ in range(3)] == [401] * 3
        r = httpx.get(url, headers=wrong)
        assert r.status_code == 429 and r.json()["error"]["code"] == "admin_auth_throttled"
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        # Even the right key waits out the window: guessing gains nothing.
        r = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 429


def test_throttle_forgets_old_failures_and_keeps_bounded_memory():
    now = [0.0]
    throttle = FailedAuthThrottle(max_failures=2, window_s=10, max_clients=100,
                                  clock=lambda: now[0])
    throttle.failed("a")
    throttle.failed("a")
    assert throttle.retry_after_s("a") == 10
    now[0] = 10.5
    assert throttle.retry_after_s("a") is None
    for i in range(10_000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100


async def test_replicas_on_one_node_each_get_their_own_port_and_a_late_one_waits():
    base = free_port()
    with socket.socket() as probe:  # the port after base must be free too
        try:
            probe.bind(("127.0.0.1", base + 1))
        except OSError:
            pytest.skip("no two consecutive free ports")
    from fastapi import FastAPI

    def app(name):
        a = FastAPI()
        a.get("/who")(lambda: {"replica": name})
        return a

    ports = range(base, base + 2)
    first, second, third = (OperatorListener(app(n), "127.0.0.1", ports, retry_interval_s=0.05)
                            for n in ("a", "b", "c"))
    for listener in (first, second, third):
        listener.start()
    try:
        await first.wait_started()
        await second.wait_started()
        assert (first.port, second.port) == (base, base + 1)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{first.url}/who")).json() == {"replica": "a"}
            assert (await http.get(f"{second.url}/who")).json() == {"replica": "b"}
            assert third.port is None  # every port taken: it retries
            await first.stop()  # a rollout stops the old replica
            await asyncio.wait_for(third.wait_started(), 5)
            assert third.port == base
            assert (await http.get(f"{third.url}/who")).json() == {"replica": "c"}
    finally:
        for listener in (first, second, third):
            await listener.stop()


def test_credential_header_over_1_kib_is_431_before_auth(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    with serve_gateway(tenancy_config(tmp_path)) as srv:
        for url in (srv.base_url + "/models", srv.operator_url + "/admin/v1/tenants"):
            for header in ("Authorization", "x-api-key"):
                r = httpx.get(url, headers={header: "Bearer " + "x" * 1100})
                assert r.status_code == 431, (url, header)
                assert r.json()["error"]["code"] == "header_too_large"
            r = httpx.get(url, headers={"Authorization": "Bearer " + "x" * 900})
            assert r.status_code == 401


HUGE_HEADER_SERVER = """
import asyncio, sys
from moestack.api.operator import build_operator_api
from moestack.serve.operator_listener import OperatorListener
from moestack.testing import fake_config, fake_model

async def main():
    config = fake_config(fake_model("fake-moe"))
    listener = OperatorListener(build_operator_api(config, None, None), "127.0.0.1",
                                range(int(sys.argv[1]), int(sys.argv[1]) + 1))
    listener.start()
    await listener.wait_started()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_a_64_mib_authorization_header_is_not_read_whole(tmp_path):
    """The operator listener (h11, 16 KiB header limit) answers 400 and closes after 16 KiB;
    its memory stays flat while the client tries to send 64 MiB."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HUGE_HEADER_SERVER, str(port)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = _rss_mb(proc.pid)
        sent, answer = 0, b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(64):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading and closed: what we want
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                pass
        time.sleep(0.2)
        after = _rss_mb(proc.pid)
        print(f"sent {sent / 2**20:.0f} MiB before the server closed; answer "
              f"{answer[:40]!r}; server RSS {before:.0f} -> {after:.0f} MB")
        assert sent < 64 << 20 or answer.startswith(b"HTTP/1.1 400")
        assert after - before < 16, (before, after)
    finally:
        proc.kill()
        proc.wait()


def test_moestack_up_refuses_a_short_admin_key_before_starting_ray(tmp_path, monkeypatch):
    import ray

    from moestack.serve.runner import up

    monkeypatch.setenv("MOESTACK_ADMIN_KEY", "short-key")
    said: list[str] = []
    assert up(tenancy_config(tmp_path), say=said.append) == 1
    text = "\n".join(said)
    assert "$MOESTACK_ADMIN_KEY has 9 characters; it needs at least 32" in text
    assert "short-key" not in text and "starting Ray" not in text
    assert not ray.is_initialized()


def test_admin_key_and_tenant_keys_never_reach_the_logs(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with serve_gateway(tenancy_config(tmp_path, admin_auth_max_failures=2)) as srv:
        key = httpx.post(srv.operator_url + "/admin/v1/tenants", headers=admin,
                         json={"name": "acme", "allowed_models": ["*"]}).json()["api_key"]
        httpx.get(srv.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
        for _ in range(3):  # failures, then throttled
            httpx.get(srv.operator_url + "/admin/v1/tenants",
                      headers={"Authorization": f"Bearer {ADMIN_KEY[:-1]}"})
    assert caplog.records  # the servers did log
    assert ADMIN_KEY not in caplog.text and ADMIN_KEY[:-1] not in caplog.text
    assert key not in caplog.text


def test_serve_env_keeps_rays_direct_ingress_off_in_both_ingress_modes():
    """With `ingress: direct` the Gateway replicas bind the public port themselves
    (moestack.serve.public_listener): Ray's per-replica port pool is never used."""
    from moestack.config.schema import MoestackConfig
    from moestack.serve.runner import THROUGHPUT_ENV, serve_env

    base = {"models": [{"name": "m", "engine": "fake"}]}
    direct = serve_env(MoestackConfig.model_validate(
        {**base, "gateway": {"ingress": "direct", "port": 9000, "num_replicas": 2,
                             "operator_port": 9001}}))
    assert direct["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert not [k for k in direct if k.startswith("RAY_SERVE_DIRECT_INGRESS_")]
    assert THROUGHPUT_ENV.items() <= direct.items()
    proxy = serve_env(MoestackConfig.model_validate(
        {**base, "ray": {"serve_throughput_optimized": False}}))
    assert proxy["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert not THROUGHPUT_ENV.keys() & proxy.keys()
