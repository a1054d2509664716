"""Multi-tenant closed-loop load over HTTP on a real Ray Serve stack, for fairness tests and the
fairness benchmark: deploy a config as its own Serve application, create tenants, run workers
per tenant with the official ``openai`` client, read what each tenant got from the usage ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from moestack.config.schema import MoestackConfig
from moestack.tenancy import query_usage
from moestack.tenancy.tables import utcnow
from moestack.tenancy.store import TenancyStore


@contextlib.contextmanager
def serve_cluster(num_cpus: int = 2) -> Iterator[int]:
    """Ray plus Serve's HTTP proxy on a free port (yielded); shut down on exit."""
    import ray
    from ray import serve

    from moestack.testing.stack_process import free_port, short_temp_dir

    tmp = short_temp_dir()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp), logging_level="WARNING")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class TenantStack:
    """One deployed application: its base URL, the ledger, and one API key per tenant."""

    name: str
    base_url: str
    store: TenancyStore
    keys: dict[str, str] = field(default_factory=dict)
    operator_urls: list[str] = field(default_factory=list)
    """The gateway replicas' operator listeners (admin API, /metrics), one each."""
    shared_counters: bool = False
    """Whether the gateways merge their virtual token counters (``shared_counters``)."""

    def client(self, tenant: str):
        import httpx
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.keys[tenant], max_retries=0, timeout=120,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256,
                                                              max_keepalive_connections=256)))

    def rows(self, tenant: str, since: dt.datetime, until: dt.datetime | None = None):
        """Ledger rows of ``tenant`` that finished with 200 in ``[since, until]``."""
        return [r for r in query_usage(self.store, tenant=tenant)
                if r.status_code == 200 and r.finished_at is not None
                and since <= r.finished_at and (until is None or r.finished_at <= until)]

    def tokens(self, tenant: str, since: dt.datetime, until: dt.datetime) -> int:
        """Prompt plus completion tokens served to ``tenant`` (prefill is work)."""
        return sum(r.prompt_tokens + r.completion_tokens for r in self.rows(tenant, since, until))


@contextlib.contextmanager
def deploy(port: int, config: MoestackConfig, name: str,
           tenants: dict[str, float]) -> Iterator[TenantStack]:
    """Run ``config`` as Serve application ``name`` under ``/name`` with ``tenants`` (name ->
    weight) created in its ledger first; the application is deleted on exit."""
    from ray import serve

    from moestack.serve.app import build_app

    store = TenancyStore.open(config.storage.url)
    gw = config.gateway
    stack = TenantStack(name, f"http://127.0.0.1:{port}/{name}/v1", store,
                        operator_urls=[f"http://{gw.operator_host}:{p}" for p in gw.operator_ports],
                        shared_counters=config.tenancy.fair_queue.shared_counters)
    for tenant, weight in tenants.items():
        stack.keys[tenant] = store.create_tenant(tenant, weight=weight)[1].plaintext
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    try:
        yield stack
    finally:
        serve.delete(name)
        store.close()


async def closed_loop(stack: TenantStack, workers: dict[str, int], seconds: float,
                      model: str, max_tokens: tuple[int, int],
                      late: dict[str, float] | None = None,
                      ramp_s: float = 1.0,
                      stream: bool = False) -> tuple[dt.datetime, dt.datetime]:
    """Closed-loop workers per tenant (``late[t]``: tenant ``t`` starts that many seconds
    late) for ``ramp_s + seconds``, each request asking for between ``max_tokens[0]`` and
    ``max_tokens[1]`` tokens (varied lengths, so that requests do not all end together);
    returns the UTC window after the ramp-up, before the stop. ``stream``: streamed requests
    (the ledger's TTFT is then the first token's, not the whole answer's)."""
    rng = random.Random(0)
    stop = asyncio.Event()
    clients = {t: stack.client(t) for t in workers}

    async def loop(tenant: str) -> None:
        await asyncio.sleep((late or {}).get(tenant, 0.0))
        while not stop.is_set():
            answer = await clients[tenant].chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello fair world"}],
                max_tokens=rng.randint(*max_tokens), stream=stream,
                **({"stream_options": {"include_usage": True}} if stream else {}))
            if stream:
                async for _ in answer:
                    pass

    # Started in turn across tenants (a1 b1 a2 b2 ...): all at once, the tenant whose workers
    # started first would take every free slot of the idle system, and VTC would then hold it
    # back until the others had received as much, for longer than a measured phase.
    tasks = [asyncio.create_task(loop(t)) for i in range(max(workers.values(), default=0))
             for t, n in workers.items() if i < n]
    try:
        await asyncio.sleep(ramp_s)
        begin = utcnow()
        await asyncio.sleep(seconds)
        end = utcnow()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for c in clients.values():
            await c.close()
    return begin, end
