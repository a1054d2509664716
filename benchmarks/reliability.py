"""Reliability summary: the gateway under abusive load, with every request reconciled against
its usage records (as the ledger bills them).

The gateway app (the one the Ray Serve Gateway deployment serves) runs over real HTTP (uvicorn,
as Ray Serve's proxy uses) with the fake engine; a usage recorder stands in for the ledger.
Phases: concurrent streams, clients leaving mid-stream and before the first token, slowloris
clients (slow headers, slow body) beside normal traffic, malformed and oversized bodies; then,
with tenancy on and the usage ledger in a SQLite file: wrong and revoked keys, a two-tenant load
with disconnects checked against the ledger, and a gateway process killed mid-load (a surviving
gateway closes the dead one's rows once their lease runs out).

For each phase it prints requests sent, failed (outcomes other than the expected one: a 5xx, a
broken stream, a wrong status; in the kill phase, streams cut by the kill), lost (a request with
no usage record; against the ledger: a completed request not settled with the tokens the client
saw), double-billed (several records for one request; against the ledger: a row charged more
than it used) and leaks (engine requests, server tasks or connections still open afterwards;
ledger rows left pending).

    .venv/bin/python benchmarks/reliability.py [--streams 1000] [--smoke]

``--smoke`` (the test suite's run): every phase with a few dozen requests; the exit status is
still 1 if any request failed, was lost or was billed twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from moestack.loadtest import parse_scenario, run_scenario
from moestack.loadtest.abuse import (
    MALFORMED_CHAT_BODIES,
    UsageRecorder,
    leave_before_first_token,
    leave_mid_stream,
    reconcile_ledger,
    slow_clients,
)
from moestack.loadtest.compare import wait_http_ok
from moestack.testing.gateway_server import LocalServer, free_port, serve_gateway
from moestack.tenancy import TenancyStore, query_usage
from moestack.testing import fake_config, fake_model
from moestack.testing.benchmark_args import parse_with_smoke

FAST, SLOW = "fake-moe", "slow-moe"
MAX_BODY = 65536

MALFORMED = list(MALFORMED_CHAT_BODIES.values())
SMOKE = {"streams": 20, "disconnects": 10, "slow": 10, "normal": 20, "ledger_requests": 20}
"""``--smoke``: every phase at the smallest size that still runs it."""


@dataclass
class Phase:
    name: str
    sent: int
    failed: int
    lost: int
    double_billed: int
    leaks: str


def chat(model: str, max_tokens: int, stream: bool = True) -> dict:
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hello there"}]}


def leaks(server: LocalServer, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        engines = sum(e.stats().running_requests for e in server.engines.values())
        if engines == 0 and server.running_tasks() == 0 and server.open_connections() == 0:
            return "none"
        time.sleep(0.1)
    return (f"engine={engines} tasks={server.running_tasks()} "
            f"connections={server.open_connections()}")


def streams_phase(server, recorder, n: int, name: str, check_leaks: bool = True) -> Phase:
    double_before = recorder.reconcile(()).double_billed
    scenario = parse_scenario({
        "name": name, "model": FAST, "num_requests": n, "max_concurrency": n, "timeout_s": 300,
        "ignore_eos": False, "tenants": [{"name": "t"}], "prompt_tokens": {"mean": 8},
        "output_tokens": {"mean": 16}})
    run = asyncio.run(run_scenario(scenario, server.base_url, {}, plots=False))
    check = recorder.reconcile(r.ledger_id for r in run.results if r.ledger_id)
    return Phase(name, n, run.report["requests"]["failed"], check.lost,
                 check.double_billed - double_before, leaks(server) if check_leaks else "")


def disconnect_phase(server, recorder, n: int, before_first_token: bool) -> Phase:
    double_before = recorder.reconcile(()).double_billed
    seen_before = set(recorder.snapshot())

    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60,
                                     limits=httpx.Limits(max_connections=n)) as http:
            if before_first_token:
                await asyncio.gather(*(leave_before_first_token(http, chat(SLOW, 8, i % 2 == 0),
                                                                0.3) for i in range(n)))
                return []
            return await asyncio.gather(*(leave_mid_stream(http, chat(SLOW, 200))
                                          for _ in range(n)))

    ids = asyncio.run(go())
    leak = leaks(server)
    new = set(recorder.snapshot()) - seen_before
    if before_first_token:  # ids are never seen: every request must still leave one record
        lost, failed = max(0, n - len(new)), 0
    else:
        lost, failed = recorder.reconcile(i for i in ids if i).lost, ids.count(None)
    name = "leave before first token" if before_first_token else "leave mid-stream"
    return Phase(name, n, failed, lost, recorder.reconcile(()).double_billed - double_before,
                 leak)


def slowloris_phase(server, recorder, slow: int, normal: int, slow_body: bool) -> Phase:
    stop = threading.Event()
    thread = threading.Thread(target=slow_clients, args=(server.port, slow, stop, slow_body))
    thread.start()
    try:
        result = streams_phase(server, recorder, normal, "beside slow clients",
                               check_leaks=False)
    finally:
        stop.set()
        thread.join()
    kind = "body" if slow_body else "headers"
    return Phase(f"{normal} requests beside {slow} slow-{kind} clients", normal, result.failed,
                 result.lost, result.double_billed, leaks(server))


def bodies_phase(server) -> Phase:
    failed = 0
    with httpx.Client(base_url=server.base_url) as http:
        for body in MALFORMED:
            resp = http.post("chat/completions", content=body,
                             headers={"content-type": "application/json"})
            failed += resp.status_code != 400 or "error" not in resp.json()
        resp = http.post("chat/completions", content=b"x" * (MAX_BODY + 1),
                         headers={"content-type": "application/json"})
        failed += resp.status_code != 413
    return Phase("malformed and oversized bodies", len(MALFORMED) + 1, failed, 0, 0,
                 leaks(server))


ADMIN_ENV = "MOESTACK_RELIABILITY_ADMIN_KEY"


def fake_models() -> list[dict]:
    return [{"name": FAST, "engine": "fake", "max_model_len": 4096,
             "fake": {"ttft_s": 0.01, "token_interval_s": 0.005}},
            {"name": SLOW, "engine": "fake", "max_model_len": 4096,
             "fake": {"ttft_s": 0.2, "token_interval_s": 0.05}}]


def ledger_rows(db_url: str) -> list:
    store = TenancyStore.open(db_url, migrate=False)
    try:
        return query_usage(store)
    finally:
        store.close()


def new_tenant(root: str, admin_key: str, name: str) -> tuple[str, str]:
    """A tenant of both models with no rate or concurrency limit (this measures loss, not
    limits); its key id and key."""
    body = {"name": name, "allowed_models": [FAST, SLOW], "requests_per_min": None,
            "max_concurrent_requests": None}
    resp = httpx.post(f"{root}/admin/v1/tenants", json=body,
                      headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    resp.raise_for_status()
    return resp.json()["key_id"], resp.json()["api_key"]


def keys_phase(root: str, operator: str, admin_key: str) -> Phase:
    key_id, key = new_tenant(operator, admin_key, "t-keys")
    httpx.delete(f"{operator}/admin/v1/keys/{key_id}",
                 headers={"Authorization": f"Bearer {admin_key}"}, timeout=30).raise_for_status()
    bad = [None, "sk-wrong", key[:-2] + "xx", key]  # missing, unknown, tampered, revoked
    failed = sent = 0
    with httpx.Client(base_url=f"{root}/v1", timeout=30) as http:
        for k in bad:
            for _ in range(25):
                headers = {"Authorization": f"Bearer {k}"} if k else {}
                resp = http.post("chat/completions", json=chat(FAST, 4, False), headers=headers)
                sent += 1
                # 401, then 429 once the address passes tenancy.auth_max_failures
                failed += resp.status_code not in (401, 429)
    return Phase("wrong, tampered, missing and revoked keys", sent, failed, 0, 0, "")


def ledger_load_phase(root: str, operator: str, admin_key: str, db_url: str, n: int) -> Phase:
    keys = {t: new_tenant(operator, admin_key, t)[1] for t in ("t-a", "t-b")}
    scenario = parse_scenario({
        "name": "ledger", "model": FAST, "num_requests": n, "max_concurrency": 100,
        "ignore_eos": False, "timeout_s": 120,
        "tenants": [{"name": "t-a", "share": 2}, {"name": "t-b"}],
        "prompt_tokens": {"kind": "uniform", "mean": 12, "min": 4, "max": 20},
        "output_tokens": {"kind": "uniform", "mean": 12, "min": 4, "max": 20}})

    async def go():
        load = asyncio.create_task(run_scenario(scenario, f"{root}/v1", keys, plots=False))
        async with httpx.AsyncClient(base_url=f"{root}/v1", timeout=60, headers={
                "Authorization": f"Bearer {keys['t-b']}"}) as http:
            await asyncio.gather(*(leave_mid_stream(http, chat(SLOW, 100)) for _ in range(30)))
        return await load

    run = asyncio.run(go())
    pending = wait_settled(db_url)
    check = reconcile_ledger(ledger_rows(db_url), run.results)
    return Phase(f"{n} two-tenant requests + 30 leaving, vs ledger", n + 30,
                 run.report["requests"]["failed"], check.lost, check.double_billed,
                 f"pending rows={pending}")


def wait_settled(db_url: str, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        pending = sum(1 for r in ledger_rows(db_url) if r.state == "pending")
        if pending == 0 or time.monotonic() > deadline:
            return pending
        time.sleep(0.3)


def kill_phase(tmp: Path, admin_key: str, n: int) -> Phase:
    db_url = f"sqlite:///{tmp / 'kill-ledger.db'}"
    config = tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "models": fake_models(), "storage": {"url": db_url},
        "tenancy": {"enabled": True, "bootstrap_tenant": None, "admin_key_env": ADMIN_ENV,
                    "lease_s": 1.5}}))
    env = {**os.environ, ADMIN_ENV: admin_key}

    def gateway(port, operator_port=None):
        proc = subprocess.Popen([sys.executable, "-m", "moestack.testing.gateway_server",
                                 "--config", str(config), "--port", str(port),
                                 "--operator-port", str(operator_port or free_port())], env=env,
                                start_new_session=True)
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=proc)
        return proc

    port, operator_port = free_port(), free_port()
    first = gateway(port, operator_port)
    survivor = None
    try:
        _, key = new_tenant(f"http://127.0.0.1:{operator_port}", admin_key, "t-kill")
        scenario = parse_scenario({
            "name": "kill", "model": SLOW, "num_requests": n, "max_concurrency": n,
            "ignore_eos": False, "timeout_s": 60,
            "arrival": {"process": "constant", "rate_rps": 20}, "tenants": [{"name": "t-kill"}],
            "prompt_tokens": {"mean": 8},
            "output_tokens": {"kind": "uniform", "mean": 20, "min": 4, "max": 40}})

        async def go():
            load = asyncio.create_task(run_scenario(scenario, f"http://127.0.0.1:{port}/v1",
                                                    {"t-kill": key}, plots=False))
            await asyncio.sleep(2.0)
            first.send_signal(signal.SIGKILL)
            return await load

        run = asyncio.run(go())
        first.wait()
        survivor_port = free_port()
        survivor = gateway(survivor_port)
        httpx.post(f"http://127.0.0.1:{survivor_port}/v1/chat/completions",
                   json=chat(FAST, 4, False), headers={"Authorization": f"Bearer {key}"},
                   timeout=30).raise_for_status()  # starts the survivor's lease keeper
        pending = wait_settled(db_url)
        check = reconcile_ledger(ledger_rows(db_url), run.results)
    finally:
        for proc in (first, survivor):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    # Streams cut by the kill are the expected outcome here, not failures.
    return Phase("gateway SIGKILLed mid-load, vs ledger", n, 0, check.lost, check.double_billed,
                 f"pending rows={pending}; completed {check.requests}, cut by the kill "
                 f"{run.report['requests']['failed']}")


def tenancy_phases(n: int) -> list[Phase]:
    admin_key = "admin-" + os.urandom(16).hex()  # the gateway wants 32+ characters
    os.environ[ADMIN_ENV] = admin_key
    tmp = Path(tempfile.mkdtemp(prefix="moestack-rel-"))
    db_url = f"sqlite:///{tmp / 'ledger.db'}"
    config = fake_config(*[fake_model(m["name"], max_model_len=m["max_model_len"],
                                      fake=m["fake"]) for m in fake_models()],
                         tenancy={"enabled": True, "bootstrap_tenant": None,
                                  "admin_key_env": ADMIN_ENV},
                         storage={"url": db_url})
    with serve_gateway(config) as server:
        # The ledger load first: wrong keys get this client's address throttled (429) for a
        # while, new good keys included.
        phases = [ledger_load_phase(server.root_url, server.operator_url, admin_key, db_url, n),
                  keys_phase(server.root_url, server.operator_url, admin_key)]
    phases.append(kill_phase(tmp, admin_key, 60))
    os.environ.pop(ADMIN_ENV, None)
    shutil.rmtree(tmp, ignore_errors=True)
    return phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    p.add_argument("--disconnects", type=int, default=200, help="clients that leave per phase")
    p.add_argument("--slow", type=int, default=200, help="slowloris connections")
    p.add_argument("--normal", type=int, default=200, help="normal requests beside the slow "
                   "clients")
    p.add_argument("--ledger-requests", type=int, default=300, help="requests of the ledger "
                   "phase")
    args = parse_with_smoke(p, argv, SMOKE)
    recorder = UsageRecorder()
    config = fake_config(
        fake_model(FAST, max_model_len=4096, fake={"ttft_s": 0.01, "token_interval_s": 0.005}),
        fake_model(SLOW, max_model_len=4096, fake={"ttft_s": 1.0, "token_interval_s": 0.05}),
        gateway={"max_body_bytes": MAX_BODY})
    phases = []
    with serve_gateway(config, sinks=[recorder]) as server:
        phases.append(streams_phase(server, recorder, args.streams,
                                    f"{args.streams} concurrent streams"))
        phases.append(disconnect_phase(server, recorder, args.disconnects, False))
        phases.append(disconnect_phase(server, recorder, args.disconnects // 2, True))
        phases.append(slowloris_phase(server, recorder, args.slow, args.normal, False))
        phases.append(slowloris_phase(server, recorder, args.slow, args.normal, True))
        phases.append(bodies_phase(server))
    phases += tenancy_phases(args.ledger_requests)
    head = f"{'phase':<48} {'sent':>6} {'failed':>7} {'lost':>5} {'double-billed':>14}  leaks"
    print(head + "\n" + "-" * (len(head) + 6))
    for ph in phases:
        print(f"{ph.name:<48} {ph.sent:>6} {ph.failed:>7} {ph.lost:>5} {ph.double_billed:>14}"
              f"  {ph.leaks}")
    total = Phase("total", sum(x.sent for x in phases), sum(x.failed for x in phases),
                  sum(x.lost for x in phases), sum(x.double_billed for x in phases), "")
    print(f"{'total':<48} {total.sent:>6} {total.failed:>7} {total.lost:>5} "
          f"{total.double_billed:>14}")
    return 0 if total.failed == total.lost == total.double_billed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
