"""A Gateway replica SIGKILLed under streamed load, on the real local stack (`moestack up`, Ray
Serve, fake engine, SQLite ledger), for each ingress mode and for one and two Gateway replicas.

What each scenario measures and prints (run with ``-s`` to see the summary lines): seconds from
the kill until the public port (and the operator port) answered again, the streams cut and the
probe requests that failed, the ledger rows per state once the lease ran out and when the last
pending row closed, and whether a tenant whose streams filled its ``max_concurrent_requests``
gets all its slots back.

Clients are the official ``openai`` client with retries off, so every failure is counted.
"""

import asyncio
import os
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from sqlalchemy import select

from moestack.tenancy.tables import Tenant, TenantCounters, UsageRow
from moestack.tenancy.store import TenancyStore
from moestack.testing.configs import fake_model, fake_stack_config
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

pytestmark = pytest.mark.integration

ADMIN_ENV = "MOESTACK_RECOVERY_ADMIN_KEY"
ADMIN_KEY = "admin-secret-for-the-recovery-tests-0123456789"
MODEL = "fake-moe"
LEASE_S = 4.0
STREAMS = 8
"""Streams of the limited tenant running at the kill: its whole max_concurrent_requests."""
STREAM_TOKENS = 100
TOKEN_INTERVAL_S = 0.05  # a stream lasts about 5 s
PROBE_INTERVAL_S = 0.1
RECOVERY_DEADLINE_S = 60.0
"""Longest the test waits for the API to answer again (the target is seconds; Ray's port
quarantine made it 150 s, which this must catch)."""


@dataclass
class Figures:
    """What one scenario measured."""

    scenario: str
    public_s: float | None = None
    operator_s: float | None = None
    held: int = 0
    streams_cut: list[str] = field(default_factory=list)
    streams_done: int = 0
    killed_at: float = 0.0
    probes: list[tuple[float, bool, str, float]] = field(default_factory=list)
    """(monotonic time sent, succeeded, why it failed, seconds it took) of each probe."""
    states: Counter = field(default_factory=Counter)
    """Ledger rows per state, all gateways."""
    dead_states: Counter = field(default_factory=Counter)
    """(tenant, state) -> rows of the dead gateway."""
    closed_s: float | None = None
    inflight_at_kill: int | None = None
    inflight_after: int | None = None
    admitted_after: int = 0

    def failed_probes(self, sent_after_kill: bool = False) -> list[tuple]:
        return [p for p in self.probes
                if not p[1] and (not sent_after_kill or p[0] >= self.killed_at)]

    def summary(self) -> str:
        failed = self.failed_probes()
        kinds = Counter(p[2] for p in failed)
        outage = [p[0] - self.killed_at for p in self.failed_probes(sent_after_kill=True)]
        slow = [f"{p[0] - self.killed_at:+.1f}s:{p[3]:.1f}s" for p in self.probes
                if p[1] and p[3] > 0.5]
        window = f", sent {min(outage):.1f}-{max(outage):.1f} s after the kill" if outage else ""
        return (f"gateway recovery [{self.scenario}]: public port answered again "
                f"{_s(self.public_s)} after the kill, operator port {_s(self.operator_s)}; "
                f"streams {STREAMS}: {len(self.streams_cut)} cut {dict(Counter(self.streams_cut))} "
                f"(the dead gateway held {self.held}), {self.streams_done} completed; probe "
                f"requests {len(self.probes)}: {len(failed)} failed {dict(kinds)}{window}, "
                f"{len(slow)} over 0.5 s (sent:took) {slow}; ledger after "
                f"the lease ({LEASE_S:g} s): {dict(sorted(self.states.items()))}, the dead "
                f"gateway's {dict(sorted(self.dead_states.items()))}, its last pending "
                f"row closed {_s(self.closed_s)} after the kill; in flight at the kill "
                f"{self.inflight_at_kill}, after {self.inflight_after}; "
                f"{self.admitted_after}/{STREAMS} requests of the tenant at "
                f"max_concurrent_requests={STREAMS} admitted afterwards")


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


@pytest.fixture
def stack_of(request):
    """``stack_of(ingress, replicas)`` starts a fake-engine stack; stopped after the test."""
    started = []

    def start(ingress: str, replicas: int):
        tmp = short_temp_dir()
        model = fake_model(MODEL, max_model_len=4096,
                           fake={"ttft_s": 0.02, "token_interval_s": TOKEN_INTERVAL_S})
        config = fake_stack_config(tmp, model, port=free_port(), ingress=ingress,
                                   gateway_replicas=replicas, lease_s=LEASE_S,
                                   admin_key_env=ADMIN_ENV)
        stack = start_stack(config, tmp, extra_env={ADMIN_ENV: ADMIN_KEY})
        stack.db_url = config["storage"]["url"]
        started.append((stack, tmp))
        return stack

    yield start
    for stack, tmp in started:
        if stack.proc.poll() is None:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def new_tenant(stack, name: str, **limits) -> str:
    with httpx.Client(base_url=f"{stack.operator_url}/admin/v1", timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        resp = http.post("tenants", json={"name": name, "allowed_models": [MODEL],
                                          "requests_per_min": None, **limits})
        assert resp.status_code == 201, resp.text
        return resp.json()["api_key"]


def ledger_rows(db_url: str) -> list[tuple[int, str, str]]:
    """(gateway process id, tenant, state) of every ledger row (a gateway id is
    ``<host>-<pid>-<random>``)."""
    store = TenancyStore.open(db_url, migrate=False)
    try:
        with store.read() as conn:
            return [(int(gw.split("-")[-2]), tenant, state) for gw, tenant, state in conn.execute(
                select(UsageRow.gateway_id, Tenant.name, UsageRow.state)
                .join(Tenant, Tenant.id == UsageRow.tenant_id))]
    finally:
        store.close()


def inflight(db_url: str, tenant: str) -> int:
    store = TenancyStore.open(db_url, migrate=False)
    try:
        with store.read() as conn:
            return conn.execute(select(TenantCounters.inflight).join(
                Tenant, Tenant.id == TenantCounters.tenant_id).where(Tenant.name == tenant)
            ).scalar_one()
    finally:
        store.close()


def pending_rows_of(db_url: str, pid: int, tenant: str | None = None) -> int:
    """Pending rows (of ``tenant``, or all) of the gateway process ``pid``."""
    return sum(p == pid and state == "pending" and tenant in (None, t)
               for p, t, state in ledger_rows(db_url))


async def closed_after(db_url: str, pid: int, t0: float) -> float | None:
    """Seconds from ``t0`` until no row of the gateway ``pid`` is pending (None: still some
    after twice the lease)."""
    while time.monotonic() - t0 < 2 * LEASE_S:
        if not await asyncio.to_thread(pending_rows_of, db_url, pid):
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


def chat(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **extra}


async def stream_one(client: openai.AsyncOpenAI, started: asyncio.Queue) -> str | None:
    """One long stream; None if it ended normally, else the error's type."""
    try:
        stream = await client.chat.completions.create(**chat(max_tokens=STREAM_TOKENS,
                                                             stream=True))
        first = True
        async for _ in stream:
            if first:
                started.put_nowait(1)
                first = False
        return None
    except Exception as exc:  # what the client of a dead gateway sees: the test counts it
        return type(exc).__name__


async def probe_until(client: openai.AsyncOpenAI, stop: asyncio.Event,
                      out: list[tuple[float, bool, str, float]]) -> None:
    """Short requests one after another (a new request every PROBE_INTERVAL_S at most)."""
    while not stop.is_set():
        sent, why = time.monotonic(), ""
        try:
            await client.chat.completions.create(**chat(max_tokens=2))
        except openai.APIStatusError as exc:
            why = f"HTTP {exc.status_code}"
        except Exception as exc:  # connection errors: counted, by type
            why = type(exc).__name__
        out.append((sent, not why, why, time.monotonic() - sent))
        await asyncio.sleep(max(0.0, PROBE_INTERVAL_S - (time.monotonic() - sent)))


async def answered_after(url: str, t0: float) -> float | None:
    """Seconds from ``t0`` until ``url`` answers 200 (None past RECOVERY_DEADLINE_S)."""
    async with httpx.AsyncClient(timeout=1.0) as http:
        while time.monotonic() - t0 < RECOVERY_DEADLINE_S:
            try:
                if (await http.get(url)).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    return None


async def kill_gateway_under_load(stack, scenario: str) -> Figures:
    figures = Figures(scenario)
    limited_key = new_tenant(stack, "limited", max_concurrent_requests=STREAMS)
    probe_key = new_tenant(stack, "probe", max_concurrent_requests=None)
    root = stack.base_url.removesuffix("/v1")
    opts = {"base_url": stack.base_url, "max_retries": 0, "timeout": 60}
    async with openai.AsyncOpenAI(api_key=limited_key, **opts) as limited, \
            openai.AsyncOpenAI(api_key=probe_key, **opts) as prober:
        started: asyncio.Queue = asyncio.Queue()
        streams = [asyncio.create_task(stream_one(limited, started)) for _ in range(STREAMS)]
        for _ in range(STREAMS):  # every stream admitted and streaming
            await asyncio.wait_for(started.get(), 60)
        figures.inflight_at_kill = inflight(stack.db_url, "limited")

        # The victim: the gateway holding the most streams (Serve's proxy may put them all on
        # one replica); the ledger names each row's gateway.
        victim = max(stack.gateway_processes(),
                     key=lambda p: pending_rows_of(stack.db_url, p.pid, "limited"))
        stop_probes = asyncio.Event()
        probes = asyncio.create_task(probe_until(prober, stop_probes, figures.probes))
        await asyncio.sleep(0.5)  # probes served before the kill
        figures.held = pending_rows_of(stack.db_url, victim.pid, "limited")
        t0 = figures.killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        closed = asyncio.create_task(closed_after(stack.db_url, victim.pid, t0))
        public, operator = await asyncio.gather(
            answered_after(f"{root}/health", t0), answered_after(f"{stack.operator_url}/health",
                                                                 t0))
        figures.public_s, figures.operator_s = public, operator
        outcomes = await asyncio.gather(*streams)
        figures.streams_cut = [o for o in outcomes if o is not None]
        figures.streams_done = outcomes.count(None)
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t0 - (public or 0))))
        stop_probes.set()
        await probes

        figures.closed_s = await closed
        await asyncio.sleep(max(0.0, LEASE_S + 1.0 - (time.monotonic() - t0)))
        rows = ledger_rows(stack.db_url)
        figures.states = Counter(state for _, _, state in rows)
        figures.dead_states = Counter((tenant, state) for pid, tenant, state in rows
                                      if pid == victim.pid)
        figures.inflight_after = inflight(stack.db_url, "limited")

        again = await asyncio.gather(*[limited.chat.completions.create(**chat(max_tokens=2))
                                       for _ in range(STREAMS)], return_exceptions=True)
        figures.admitted_after = sum(not isinstance(r, BaseException) for r in again)
    print("\n" + figures.summary())
    return figures


@pytest.mark.parametrize("ingress", ["direct", "proxy"])
async def test_killed_gateway_is_replaced_on_the_same_ports_and_its_rows_close_as_lost(
        stack_of, ingress):
    stack = stack_of(ingress, 1)
    f = await kill_gateway_under_load(stack, f"{ingress} ingress, 1 gateway replica")
    assert f.public_s is not None and f.operator_s is not None
    assert len(f.streams_cut) == STREAMS and f.held == STREAMS  # every stream was its
    if ingress == "direct":  # nothing listened until the successor bound the port ...
        assert {p[2] for p in f.failed_probes(sent_after_kill=True)} == {"APIConnectionError"}
    else:  # ... while Serve's proxy holds requests until a Gateway replica is back
        assert not f.failed_probes(sent_after_kill=True)
    assert f.probes[-1][1]  # ... and serves again
    assert f.closed_s is not None and ("limited", "pending") not in f.dead_states
    assert f.dead_states["limited", "lost"] == STREAMS
    assert f.dead_states["probe", "lost"] <= 1 and ("probe", "pending") not in f.dead_states
    assert f.inflight_at_kill == STREAMS and f.inflight_after == 0
    assert f.admitted_after == STREAMS


@pytest.mark.parametrize("ingress", ["direct", "proxy"])
async def test_surviving_gateway_serves_throughout_when_the_other_is_killed(stack_of, ingress):
    stack = stack_of(ingress, 2)
    assert len(stack.gateway_processes()) == 2
    f = await kill_gateway_under_load(stack, f"{ingress} ingress, 2 gateway replicas")
    assert f.held > 0
    assert len(f.streams_cut) == f.held and f.streams_done == STREAMS - f.held
    assert not f.failed_probes(sent_after_kill=True)  # at most one in flight at the kill
    assert len(f.failed_probes()) <= 1
    assert f.public_s is not None and f.operator_s is not None
    assert f.closed_s is not None and ("limited", "pending") not in f.dead_states
    assert f.dead_states["limited", "lost"] == f.held
    assert f.dead_states["probe", "lost"] <= 1 and ("probe", "pending") not in f.dead_states
    assert f.inflight_at_kill == STREAMS and f.inflight_after == 0
    assert f.admitted_after == STREAMS
