"""The replica-kill probe of request migration, shared by the integration test and
``benchmarks/migration.py``.

A real Ray Serve ModelServer deployment (tiny DeepSeek-V3, vLLM on CPU, ``replicas`` replicas)
behind the gateway app in this process (tenancy on, SQLite ledger), driven by the official
``openai`` client with retries off: ``requests`` streamed chat requests of ``max_tokens``
tokens; once the first stream has text, the replica with the most requests under way
is SIGKILLed. Every client-visible error counts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "tiny-v3"
PROMPTS = ("Tell me a long story about the sea.", "What is a mixture of experts?",
           "Write a poem about the mountains.", "Explain how a compiler works.")
APP_NAME = "migration-probe"
MARKER_ENV = "MOESTACK_MIGRATION_PROBE"
"""Set in the probe's ModelServer replicas: the probe kills only its own processes."""


@dataclass
class ProbeStack:
    app: Any
    handle: Any
    tmp: Path
    marker: str
    db_url: str
    model: Any = None
    """The deployed ModelConfig."""
    key: str = ""
    started: float = 0.0
    """``time.time()`` at the start: shared-memory files changed since are the stack's."""
    shm_left_after_stop: list[str] | None = None
    """The engines' /dev/shm files of this run no process uses, after the stop's cleanup."""

    def replica_processes(self) -> list:
        """This probe's live ModelServer replica processes (``psutil.Process``), oldest first."""
        import psutil

        found = []
        for p in psutil.process_iter():
            try:
                if (p.environ().get(MARKER_ENV) == self.marker
                        and "ServeReplica" in " ".join(p.cmdline())):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return sorted(found, key=lambda p: p.create_time())


def model_dict(replicas: int, marker: str, multiprocessing: bool = False) -> dict[str, Any]:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", MARKER_ENV: marker}
    if not multiprocessing:  # the engine core in the replica's process: faster to start
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"name": MODEL, "tiny": {"arch": "deepseek-v3", "seed": 0},
            "architecture": "DeepseekV3ForCausalLM", "max_model_len": 512,
            "num_replicas": replicas,
            "env": env,
            "engine_args": {"enforce_eager": True}}


@contextmanager
def probe_stack(replicas: int = 2, multiprocessing: bool = False) -> Iterator[ProbeStack]:
    """Ray, the ModelServer deployment and the gateway app over it (not yet started: run
    :func:`start_tenancy` inside the event loop that drives it)."""
    import ray
    from ray import serve

    from moestack.api.app import build_api
    from moestack.engine.source import resolve_checkpoint
    from moestack.serve.app import model_server_app
    from moestack.serve.backend import ServeBackend
    from moestack.serve.shm import clean_orphans, orphans
    from moestack.testing import fake_config
    from moestack.testing.stack_process import free_port, short_temp_dir

    tmp = short_temp_dir()
    marker = secrets.token_hex(8)
    db_url = f"sqlite:///{tmp / 'ledger.db'}"
    own_admin_key = "MOESTACK_ADMIN_KEY" not in os.environ  # removed again at the end
    os.environ.setdefault("MOESTACK_ADMIN_KEY", secrets.token_urlsafe(32))
    started = time.time()
    config = fake_config(model_dict(replicas, marker, multiprocessing), storage={"url": db_url},
                         tenancy={"enabled": True, "auth_cache_ttl_s": 0},
                         gateway={"first_token_timeout_s": 120})
    model = config.models[0]
    resolve_checkpoint(model, config.cache_dir)  # build the tiny checkpoint once, here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
             logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(model_server_app(model, None), name=APP_NAME,
                           route_prefix=None)
        app = build_api(config, ServeBackend({MODEL: handle}))
        stack = ProbeStack(app, handle, tmp, marker, db_url, model, started=started)
        yield stack
    finally:
        if own_admin_key:
            os.environ.pop("MOESTACK_ADMIN_KEY", None)
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    clean_orphans(since=started, min_age_s=0)  # as `moestack up` does at its stop
    stack.shm_left_after_stop = [p.name for p in orphans(since=started, min_age_s=0)]


@dataclass
class StreamResult:
    prompt: str
    text: str = ""
    error: str | None = None
    usage: Any = None
    started: float = 0.0
    first_s: float | None = None
    e2e_s: float | None = None


@dataclass
class KillFigures:
    requests: int
    errors: list[str] = field(default_factory=list)
    migrated: int = 0
    resume_s: list[float] = field(default_factory=list)
    ledger_rows: int = 0
    ledger_prompt_tokens: int = 0
    ledger_completion_tokens: int = 0
    expected_prompt_tokens: int = 0
    expected_completion_tokens: int = 0
    same_text_as_unfailed: int = 0
    killed_pid: int | None = None
    killed_at_s: float | None = None
    """Seconds from the start of the load to the kill."""
    kill_error: str | None = None
    shm_orphans_after_kill: list[str] = field(default_factory=list)
    """The engines' /dev/shm files of this run that no process uses, once the killed
    replica's successor runs."""
    wall_s: float = 0.0
    longest_stream_s: float = 0.0

    def quantile(self, q: float) -> float | None:
        if not self.resume_s:
            return None
        s = sorted(self.resume_s)
        return s[min(len(s) - 1, int(q * len(s)))]

    def lines(self) -> list[str]:
        p50, p95 = self.quantile(0.5), self.quantile(0.95)
        return [
            f"streams {self.requests}, client-visible errors {len(self.errors)}",
            f"requests migrated {self.migrated}; extra TTFT of a migrated request (failure to "
            f"resumed first chunk) p50 {p50 if p50 is None else round(p50, 3)} s, p95 "
            f"{p95 if p95 is None else round(p95, 3)} s",
            f"ledger rows {self.ledger_rows} for {self.requests} answers; tenant tokens "
            f"prompt {self.ledger_prompt_tokens} (expected {self.expected_prompt_tokens}), "
            f"completion {self.ledger_completion_tokens} (expected "
            f"{self.expected_completion_tokens})",
            f"texts equal to the same request without failure: {self.same_text_as_unfailed} of "
            f"{self.requests}; wall {self.wall_s:.1f} s, longest stream "
            f"{self.longest_stream_s:.1f} s",
            f"killed replica pid {self.killed_pid} at {self.killed_at_s} s of the load"
            + (f" (kill failed: {self.kill_error})" if self.kill_error else ""),
            f"/dev/shm files of the stack left unused after the kill: "
            f"{len(self.shm_orphans_after_kill)}",
        ]


def busiest_replica_pid(app_name: str = APP_NAME) -> int:
    """The process id of the ModelServer replica with the most requests under way (asked of
    each replica actor: the router need not spread a burst evenly)."""
    import ray

    best: tuple[int, int] | None = None
    prefix = f"SERVE_REPLICA::{app_name}#ModelServer"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if not entry["name"].startswith(prefix):
            continue
        actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
        try:
            ongoing = ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
            pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)
        except ray.exceptions.RayError:  # a replica going away: not the one to kill
            continue
        if best is None or ongoing > best[0]:
            best = (ongoing, pid)
    if best is None:
        raise RuntimeError(f"no live ModelServer replica of {app_name}")
    return best[1]


async def start_tenancy(stack: ProbeStack) -> None:
    tenancy, scheduler = stack.app.state.tenancy, stack.app.state.scheduler
    tenancy.start()
    scheduler.start()
    stack.key = tenancy.store.create_tenant(f"probe-{secrets.token_hex(3)}")[1].plaintext


async def stop_tenancy(stack: ProbeStack) -> None:
    await stack.app.state.scheduler.stop()
    await stack.app.state.tenancy.stop()


def _client(stack: ProbeStack, key: str | None = None):
    import httpx
    import openai

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app),
                             base_url="http://moestack.test", timeout=600)
    return openai.AsyncOpenAI(base_url="http://moestack.test/v1", api_key=key or stack.key,
                              http_client=http, max_retries=0)


async def _stream(client, prompt: str, max_tokens: int, on_text) -> StreamResult:
    r = StreamResult(prompt, started=time.monotonic())
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        parts = []
        async for chunk in stream:
            if chunk.usage is not None:
                r.usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    if r.first_s is None:
                        r.first_s = time.monotonic() - r.started
                        on_text()
                    parts.append(c.delta.content)
        r.text = "".join(parts)
    except Exception as exc:  # noqa: BLE001 - every client-visible failure is a figure
        r.error = f"{type(exc).__name__}: {exc}"[:200]
    r.e2e_s = time.monotonic() - r.started
    return r


async def unfailed_texts(stack: ProbeStack, max_tokens: int) -> dict[str, tuple[str, int]]:
    """Per prompt: the text and prompt tokens of the request run alone, nothing failing."""
    client = _client(stack)
    out = {}
    for p in PROMPTS:
        r = await _stream(client, p, max_tokens, lambda: None)
        assert r.error is None, r.error
        out[p] = (r.text, r.usage.prompt_tokens)
    return out


async def kill_probe(stack: ProbeStack, requests: int, max_tokens: int,
                     reference: dict[str, tuple[str, int]], kill: bool = True) -> KillFigures:
    """``requests`` concurrent streams; the busiest replica SIGKILLed at the first text."""
    from sqlalchemy import func, select

    from moestack.tenancy.tables import Tenant, UsageRow

    migrator = stack.app.state.relay.migrator
    migrated_before, delays_before = migrator.migrated[MODEL], len(migrator.resume_delays_s)
    figures = KillFigures(requests)
    tenant = f"probe-{secrets.token_hex(4)}"  # its own tenant: its ledger rows are the run's
    store = stack.app.state.tenancy.store
    client = _client(stack, store.create_tenant(tenant)[1].plaintext)
    with_text = asyncio.Event()
    counted = [0]

    def on_text() -> None:
        counted[0] += 1
        if counted[0] >= 1:
            with_text.set()

    async def killer() -> None:
        await with_text.wait()
        # Its own thread: the default executor is busy with the gateway's ledger writes.
        with ThreadPoolExecutor(1) as pool:
            pid = await asyncio.get_running_loop().run_in_executor(pool, busiest_replica_pid)
        figures.killed_pid = pid
        os.kill(pid, signal.SIGKILL)
        figures.killed_at_s = time.monotonic() - started

    started = time.monotonic()
    kill_task = asyncio.create_task(killer()) if kill else None
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    results = await asyncio.gather(*(_stream(client, p, max_tokens, on_text) for p in prompts))
    figures.wall_s = time.monotonic() - started
    if kill_task is not None:
        if not kill_task.done():
            kill_task.cancel()
        (outcome,) = await asyncio.gather(kill_task, return_exceptions=True)
        if isinstance(outcome, BaseException):
            figures.kill_error = f"{type(outcome).__name__}: {outcome}"
    figures.errors = [r.error for r in results if r.error]
    figures.migrated = migrator.migrated[MODEL] - migrated_before
    figures.resume_s = list(migrator.resume_delays_s)[delays_before:]
    figures.longest_stream_s = max(r.e2e_s or 0 for r in results)
    figures.same_text_as_unfailed = sum(r.text == reference[r.prompt][0] for r in results)
    figures.expected_prompt_tokens = sum(reference[r.prompt][1] for r in results)
    figures.expected_completion_tokens = requests * max_tokens
    await asyncio.sleep(0.5)  # the ledger settles each row as its stream ends
    with store.read() as conn:
        rows, prompt, completion = conn.execute(
            select(func.count(), func.sum(UsageRow.prompt_tokens),
                   func.sum(UsageRow.completion_tokens))
            .join(Tenant, Tenant.id == UsageRow.tenant_id).where(Tenant.name == tenant)).one()
    figures.ledger_rows = rows
    figures.ledger_prompt_tokens, figures.ledger_completion_tokens = prompt or 0, completion or 0
    if kill:
        from moestack.serve.shm import orphans

        await asyncio.to_thread(wait_replaced, stack, figures.killed_pid)
        figures.shm_orphans_after_kill = [p.name for p in orphans(since=stack.started,
                                                                  min_age_s=0)]
    return figures


@dataclass
class UpdateFigures:
    streams: int = 0
    errors: list[str] = field(default_factory=list)
    migrated: int = 0
    update_s: float = 0.0
    longest_stream_s: float = 0.0

    def lines(self) -> list[str]:
        return [f"rolling update took {self.update_s:.1f} s; streams {self.streams}, "
                f"client-visible errors {len(self.errors)}, migrated {self.migrated}, longest "
                f"stream {self.longest_stream_s:.1f} s"]


def wait_running(app_name: str = APP_NAME, timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{app_name} not RUNNING after {timeout_s:g} s")


def wait_replaced(stack: ProbeStack, killed_pid: int | None, timeout_s: float = 300.0) -> None:
    """Until the killed replica's successor runs (it cleans /dev/shm as it starts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [p.pid for p in stack.replica_processes()]
        if killed_pid not in pids and len(pids) >= stack.model.num_replicas:
            break
        time.sleep(0.5)
    wait_running(timeout_s=max(1.0, deadline - time.monotonic()))


async def rolling_update_probe(stack: ProbeStack, concurrency: int, max_tokens: int
                               ) -> UpdateFigures:
    """Redeploy the ModelServer as a new version while ``concurrency`` streams keep coming."""
    from ray import serve

    from moestack.serve.app import model_server_app

    await asyncio.to_thread(wait_running)
    migrator = stack.app.state.relay.migrator
    migrated_before = migrator.migrated[MODEL]
    figures = UpdateFigures()
    tenant = f"update-{secrets.token_hex(4)}"
    client = _client(stack, stack.app.state.tenancy.store.create_tenant(tenant)[1].plaintext)
    new = stack.model.model_copy(update={"env": {**stack.model.env,
                                                 "MOESTACK_PROBE_VERSION": secrets.token_hex(4)}})
    done = asyncio.Event()
    results: list[StreamResult] = []

    async def worker(i: int) -> None:
        n = 0
        while not done.is_set():
            results.append(await _stream(client, PROMPTS[(i + n) % len(PROMPTS)], max_tokens,
                                         lambda: None))
            n += 1

    def redeploy() -> None:
        serve.run(model_server_app(new, None), name=APP_NAME, route_prefix=None)
        wait_running()

    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(1.0)
    started = time.monotonic()
    try:
        await asyncio.to_thread(redeploy)
    finally:
        figures.update_s = time.monotonic() - started
        done.set()
        await asyncio.gather(*workers)
    stack.model = new
    figures.streams = len(results)
    figures.errors = [r.error for r in results if r.error]
    figures.longest_stream_s = max((r.e2e_s or 0 for r in results), default=0.0)
    figures.migrated = migrator.migrated[MODEL] - migrated_before
    return figures
