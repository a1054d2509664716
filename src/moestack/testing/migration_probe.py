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
import hashlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator
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
    http: Any = None
    """The uvicorn server that serves ``app`` over real HTTP (while tenancy runs)."""
    started: float = 0.0
    """``time.time()`` at the start: shared-memory files changed since are the stack's."""
    shm_left_after_stop: list[str] | None = None
    """The engines' /dev/shm files of this run no process uses, after the stop's cleanup."""
    ready_s: float = 0.0
    """Seconds from the start until Ray and the deployment's replicas ran."""

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


def model_dict(replicas: int, marker: str) -> dict[str, Any]:
    """The probe's model: its engines laid out as ``moestack up`` runs them (the engine core
    in a process of its own, its one worker in it: moestack.engine.vllm_engine.engine_env)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", MARKER_ENV: marker}
    return {"name": MODEL, "tiny": {"arch": "deepseek-v3", "seed": 0},
            "architecture": "DeepseekV3ForCausalLM", "max_model_len": 2048,
            "num_replicas": replicas,
            "env": env,
            "engine_args": {"enforce_eager": True}}


@contextmanager
def probe_stack(replicas: int = 2) -> Iterator[ProbeStack]:
    """Ray, the ModelServer deployment and the gateway app over it (not yet started: run
    :func:`start_tenancy` inside the event loop that drives it)."""
    import ray
    from ray import serve

    from moestack.api.app import build_api
    from moestack.engine.source import resolve_checkpoint
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
    config = fake_config(model_dict(replicas, marker), storage={"url": db_url},
                         tenancy={"enabled": True, "auth_cache_ttl_s": 0},
                         gateway={"first_token_timeout_s": 120})
    model = config.models[0]
    resolve_checkpoint(model, config.cache_dir)  # build the tiny checkpoint once, here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
             logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(model_server(model), name=APP_NAME, route_prefix=None)
        app = build_api(config, ServeBackend({MODEL: handle}))
        stack = ProbeStack(app, handle, tmp, marker, db_url, model, started=started,
                           ready_s=time.time() - started)
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
    replaced_s: float | None = None
    """Seconds from the kill until the killed replica's successor ran."""
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
            f"the killed replica's successor ran "
            f"{'-' if self.replaced_s is None else round(self.replaced_s, 1)} s after the kill",
            f"/dev/shm files of the stack left unused after the kill: "
            f"{len(self.shm_orphans_after_kill)}",
        ]


def ongoing_by_pid(app_name: str = APP_NAME) -> dict[int, int]:
    """Process id -> requests under way, of each ModelServer replica of ``app_name`` that
    answers (asked of each replica actor, a draining one included)."""
    import ray

    counts = {}
    prefix = f"SERVE_REPLICA::{app_name}#ModelServer"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if not entry["name"].startswith(prefix):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            ongoing = ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
            pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)
        except (ray.exceptions.RayError, ValueError):  # a replica going away
            continue
        counts[pid] = ongoing
    return counts


def busiest_replica_pid(app_name: str = APP_NAME) -> int:
    """The process id of the ModelServer replica with the most requests under way (the router
    need not spread a burst evenly)."""
    counts = ongoing_by_pid(app_name)
    if not counts:
        raise RuntimeError(f"no live ModelServer replica of {app_name}")
    return max(counts, key=counts.__getitem__)


async def start_tenancy(stack: ProbeStack) -> None:
    """Start tenancy and the fair queue, and serve the app over real HTTP on a free port (an
    in-memory ASGI transport would hold each streamed answer back until its end)."""
    import uvicorn

    from moestack.net import free_port

    tenancy, scheduler = stack.app.state.tenancy, stack.app.state.scheduler
    tenancy.start()
    scheduler.start()
    stack.key = tenancy.store.create_tenant(f"probe-{secrets.token_hex(3)}")[1].plaintext
    stack.http = uvicorn.Server(uvicorn.Config(stack.app, host="127.0.0.1", port=free_port(),
                                               lifespan="off", log_level="warning"))
    stack.http.task = asyncio.create_task(stack.http.serve())
    while not stack.http.started:
        if stack.http.task.done():
            stack.http.task.result()  # raises why it could not start
        await asyncio.sleep(0.05)


async def stop_tenancy(stack: ProbeStack) -> None:
    if stack.http is not None:
        stack.http.should_exit = True
        await stack.http.task
    await stack.app.state.scheduler.stop()
    await stack.app.state.tenancy.stop()


def _client(stack: ProbeStack, key: str | None = None):
    import openai

    port = stack.http.config.port
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key or stack.key,
                              max_retries=0, timeout=600)


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


def _streams_with_text(count: int) -> tuple[asyncio.Event, Callable[[], None]]:
    """An event set once ``count`` streams have text, and the ``on_text`` callback of
    :func:`_stream` that counts them."""
    event, seen = asyncio.Event(), [0]

    def on_text() -> None:
        seen[0] += 1
        if seen[0] >= count:
            event.set()

    return event, on_text


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
    migrator = stack.app.state.relay.migrator
    migrated_before, delays_before = migrator.migrated[MODEL], len(migrator.resume_delays_s)
    figures = KillFigures(requests)
    tenant = f"probe-{secrets.token_hex(4)}"  # its own tenant: its ledger rows are the run's
    store = stack.app.state.tenancy.store
    client = _client(stack, store.create_tenant(tenant)[1].plaintext)
    with_text, on_text = _streams_with_text(1)

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
    (figures.ledger_rows, figures.ledger_prompt_tokens,
     figures.ledger_completion_tokens) = await _ledger(store, tenant)
    if kill:
        from moestack.serve.shm import orphans

        # The killed replica's successor cleans /dev/shm as it starts.
        await asyncio.to_thread(wait_replicas, stack, stack.model.num_replicas,
                                figures.killed_pid)
        if figures.killed_at_s is not None:
            figures.replaced_s = time.monotonic() - started - figures.killed_at_s
        figures.shm_orphans_after_kill = [p.name for p in orphans(since=stack.started,
                                                                  min_age_s=0)]
    return figures


async def _ledger(store, tenant: str) -> tuple[int, int, int]:
    """The tenant's ledger rows, prompt tokens and completion tokens."""
    from sqlalchemy import func, select

    from moestack.tenancy.tables import Tenant, UsageRow

    await asyncio.sleep(0.5)  # the ledger settles each row as its stream ends
    with store.read() as conn:
        rows, prompt, completion = conn.execute(
            select(func.count(), func.sum(UsageRow.prompt_tokens),
                   func.sum(UsageRow.completion_tokens))
            .join(Tenant, Tenant.id == UsageRow.tenant_id).where(Tenant.name == tenant)).one()
    return rows, prompt or 0, completion or 0


@dataclass
class DrainFigures:
    streams: int
    drain_after_s: float | None
    """``gateway.migration.drain_after_s`` of the run (None: streams finish in place)."""
    errors: list[str] = field(default_factory=list)
    moved: int = 0
    """Streams the gateway ended on the draining replica and resumed on the live one."""
    idle_s: float | None = None
    """Seconds from the scale-down until the draining replica had no request under way."""
    stopped_s: float | None = None
    """Seconds from the scale-down to the draining replica's exit (None: it did not exit)."""
    streams_done_s: float = 0.0
    """Seconds from the scale-down to the end of the last stream."""
    ledger_rows: int = 0
    ledger_tokens: tuple[int, int] = (0, 0)
    expected_tokens: tuple[int, int] = (0, 0)

    def lines(self) -> list[str]:
        mode = ("streams finish in place" if self.drain_after_s is None else
                f"streams move after {self.drain_after_s:g} s")
        idle = "never" if self.idle_s is None else f"{self.idle_s:.1f} s"
        stopped = "did not stop" if self.stopped_s is None else f"stopped {self.stopped_s:.1f} s"
        return [f"scale-down 2 -> 1 under {self.streams} streams ({mode}): the draining replica "
                f"had no request under way {idle} and {stopped} after the scale-down; last "
                f"stream ended at {self.streams_done_s:.1f} s; client-visible errors "
                f"{len(self.errors)}; streams moved {self.moved}",
                f"ledger rows {self.ledger_rows} for {self.streams} answers; tenant tokens "
                f"(prompt, completion) {self.ledger_tokens}, expected {self.expected_tokens}"]


def model_server(model: Any, num_replicas: int | None = None) -> Any:
    """The probe's ModelServer application of ``model``, its deployment versioned by the
    model's config: deployed again with only ``num_replicas`` changed, Serve scales the running
    deployment; a changed model is a new version, a rolling update. (Unversioned, Python's
    ``serve.run`` gives every deploy a new random version: each one would be a rollout.)"""
    from ray.serve import Application

    from moestack.serve.app import model_server_app

    deployment = model_server_app(model, None, num_replicas)._bound_deployment
    version = hashlib.sha256(model.model_dump_json().encode()).hexdigest()[:16]
    return Application(deployment.options(version=version, _internal=True))


def _deploy(stack: ProbeStack, num_replicas: int | None = None) -> None:
    """(Re)deploy the probe's ModelServer as ``stack.model`` (with ``num_replicas``: scaled
    only, no new version), until the application runs."""
    from ray import serve

    serve.run(model_server(stack.model, num_replicas), name=APP_NAME, route_prefix=None)
    wait_running()


async def drain_probe(stack: ProbeStack, streams: int, max_tokens: int,
                      reference: dict[str, tuple[str, int]],
                      drain_after_s: float | None) -> DrainFigures:
    """Scale the ModelServer from 2 replicas to 1 while ``streams`` long streams run on both,
    with ``gateway.migration.drain_after_s`` set to ``drain_after_s``; leaves 1 replica."""
    migrator = stack.app.state.relay.migrator
    backend = migrator.backend
    await asyncio.to_thread(_deploy, stack, 2)
    await asyncio.to_thread(wait_replicas, stack, 2)
    figures = DrainFigures(streams, drain_after_s)
    tenant = f"drain-{secrets.token_hex(4)}"
    store = stack.app.state.tenancy.store
    client = _client(stack, store.create_tenant(tenant)[1].plaintext)
    configured, migrator.drain_after_s = migrator.drain_after_s, drain_after_s
    moved_before = backend.drained[MODEL]
    all_text, on_text = _streams_with_text(streams)

    before = {p.pid for p in await asyncio.to_thread(stack.replica_processes)}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    tasks = [asyncio.create_task(_stream(client, p, max_tokens, on_text)) for p in prompts]
    try:
        await asyncio.wait_for(all_text.wait(), 300)
        scaled = time.monotonic()
        # Serve reports the application running again only once the replica stopped: watch
        # the replicas meanwhile.
        deploy = asyncio.create_task(asyncio.to_thread(_deploy, stack, 1))
        idle_since: dict[int, float] = {}  # pid -> since when it has had no request under way
        while time.monotonic() - scaled < 300:
            counts = await asyncio.to_thread(ongoing_by_pid)
            at = time.monotonic() - scaled
            for pid, ongoing in counts.items():
                if ongoing:
                    idle_since.pop(pid, None)
                else:
                    idle_since.setdefault(pid, at)
            if gone := before - {p.pid for p in await asyncio.to_thread(stack.replica_processes)}:
                figures.stopped_s = time.monotonic() - scaled
                figures.idle_s = idle_since.get(next(iter(gone)))
                break
            await asyncio.sleep(0.2)
        await deploy
        results = await asyncio.gather(*tasks)
    finally:
        migrator.drain_after_s = configured
        for t in tasks:
            t.cancel()
    figures.errors = [r.error for r in results if r.error]
    figures.moved = backend.drained[MODEL] - moved_before
    figures.streams_done_s = max(r.started + (r.e2e_s or 0) for r in results) - scaled
    rows, prompt, completion = await _ledger(store, tenant)
    figures.ledger_rows, figures.ledger_tokens = rows, (prompt, completion)
    figures.expected_tokens = (sum(reference[p][1] for p in prompts), streams * max_tokens)
    return figures


@dataclass
class UpdateFigures:
    streams: int = 0
    errors: list[str] = field(default_factory=list)
    migrated: int = 0
    moved: int = 0
    """Of ``migrated``: streams moved off a draining replica."""
    update_s: float = 0.0
    longest_stream_s: float = 0.0

    def lines(self) -> list[str]:
        return [f"rolling update took {self.update_s:.1f} s; streams {self.streams}, "
                f"client-visible errors {len(self.errors)}, migrated {self.migrated} (moved off "
                f"a draining replica {self.moved}), longest stream "
                f"{self.longest_stream_s:.1f} s"]


def wait_running(app_name: str = APP_NAME, timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{app_name} not RUNNING after {timeout_s:g} s")


def wait_replicas(stack: ProbeStack, count: int, gone_pid: int | None = None,
                  timeout_s: float = 300.0) -> None:
    """Until ``count`` replica processes of the probe run, ``gone_pid`` (a killed replica) not
    among them, and the application is RUNNING."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [p.pid for p in stack.replica_processes()]
        if len(pids) == count and gone_pid not in pids:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {count} replicas (without {gone_pid}) after "
                               f"{timeout_s:g} s: {pids}")
        time.sleep(0.5)
    wait_running(timeout_s=max(1.0, deadline - time.monotonic()))


async def rolling_update_probe(stack: ProbeStack, concurrency: int, max_tokens: int,
                               replicas: int) -> UpdateFigures:
    """Redeploy the ModelServer, at ``replicas`` replicas, as a new version while
    ``concurrency`` streams keep coming."""
    await asyncio.to_thread(_deploy, stack, replicas)
    await asyncio.to_thread(wait_replicas, stack, replicas)
    migrator = stack.app.state.relay.migrator
    migrated_before, moved_before = migrator.migrated[MODEL], migrator.backend.drained[MODEL]
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

    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(1.0)
    started = time.monotonic()
    old, stack.model = stack.model, new
    try:
        await asyncio.to_thread(_deploy, stack, replicas)
    except BaseException:
        stack.model = old
        raise
    finally:
        figures.update_s = time.monotonic() - started
        done.set()
        await asyncio.gather(*workers)
    figures.streams = len(results)
    figures.errors = [r.error for r in results if r.error]
    figures.longest_stream_s = max((r.e2e_s or 0 for r in results), default=0.0)
    figures.migrated = migrator.migrated[MODEL] - migrated_before
    figures.moved = migrator.backend.drained[MODEL] - moved_before
    return figures
