"""Several ModelServer replicas (fake engine) on a real Ray Serve: routing, autoscaling, drain and
failover through the gateway's HTTP app over its ServeBackend (in-process ASGI, so every request
leaves the gateway's usage record). One Ray cluster for the module; each test deploys and deletes
its own application."""

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from moestack.api.relay import REQUEST_ID_HEADER
from moestack.config.schema import ModelConfig
from moestack.testing import fake_config, fake_model
from moestack.testing.stack_process import free_port, short_temp_dir
from moestack.usage import NO_USAGE, Usage

pytestmark = pytest.mark.integration

MODEL = "fake-moe"


@pytest.fixture(scope="module")
def proxy_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def serve_cluster(proxy_port):
    import ray
    from ray import serve

    tmp = short_temp_dir()
    saved = {k: os.environ.get(k) for k in (
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S")}
    os.environ.update({k: "0.5" for k in saved})  # autoscaling signals every 0.5 s, not 10 s
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
             logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
    yield serve
    serve.shutdown()
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(tmp, ignore_errors=True)


class Records:
    def __init__(self):
        self.items = []

    def record(self, record):
        self.items.append(record)


@dataclass(frozen=True)
class Answer:
    """What a client read from one /v1/completions call."""

    request_id: str
    status: int
    finish_reason: str | None
    usage: Usage
    """The answer's own usage (for streams: the include_usage event; none if it failed)."""
    error: dict | None = None
    """The error object (a stream's error event, or a non-2xx body)."""


def _usage(u: dict | None) -> Usage:
    if not u:
        return NO_USAGE
    return Usage(u["prompt_tokens"], u["completion_tokens"],
                 (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def read_answer(response: httpx.Response, stream: bool) -> Answer:
    rid, status = response.headers[REQUEST_ID_HEADER], response.status_code
    if not stream or status >= 400:
        body = response.json()
        if status >= 400:
            return Answer(rid, status, None, NO_USAGE, body.get("error", body))
        return Answer(rid, status, body["choices"][0]["finish_reason"], _usage(body["usage"]))
    finish, usage, error = None, NO_USAGE, None
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if "error" in event:
            error = event["error"]
            continue
        for choice in event.get("choices") or ():
            finish = choice.get("finish_reason") or finish
        usage = _usage(event.get("usage")) if event.get("usage") else usage
    return Answer(rid, status, finish, usage, error)


class Deployed:
    """One model's ModelServer deployment, behind the gateway's app as the gateway reaches it."""

    def __init__(self, serve, app: str, **model):
        from moestack.api.app import build_api
        from moestack.serve.app import model_server_app
        from moestack.serve.backend import ServeBackend

        self.serve, self.app = serve, app
        self.config = fake_config(fake_model(MODEL, cpus_per_worker=0.1, max_model_len=4096,
                                             **model))
        self.model: ModelConfig = self.config.models[0]
        self.handle = serve.run(model_server_app(self.model, None), name=app, route_prefix=None)
        self.backend = ServeBackend({MODEL: self.handle},
                                    {MODEL: self.model.routing.max_attempts_before_first_token})
        self.records = Records()
        api = build_api(self.config, self.backend, [self.records])
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                      base_url="http://moestack.test", timeout=300)

    async def redeploy(self, **changes):
        """Apply a changed model config (waits in a thread: serve.run blocks until deployed)."""
        from moestack.serve.app import model_server_app

        model = self.model.model_copy(update=changes)
        await asyncio.to_thread(self.serve.run, model_server_app(model, None), name=self.app,
                                route_prefix=None)

    def running_replicas(self) -> int:
        status = self.serve.status().applications[self.app]
        return next(iter(status.deployments.values())).replica_states.get("RUNNING", 0)

    def replica_names(self) -> list[str]:
        import ray

        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{self.app}#")]

    async def reports(self, expected: int) -> dict[str, dict]:
        """Each live replica's report, once this process's router knows ``expected`` of them.

        One call through the handle (it starts the router, which Serve keeps told of the live
        replicas), then one pinned to each other replica: calls left to Serve go to the replica
        with the shortest cached queue, which skips a replica whose cached length is stale."""
        from moestack.routing.types import ReplicaTarget

        first = await self.handle.replica_report.remote()
        await wait_until(lambda: len(self._replica_ids()) >= expected, 30,
                         f"the router to know {expected} replicas")
        found = {first["replica"]: first}
        for rid in sorted(self._replica_ids() - found.keys()):
            report = await self.handle.replica_report.remote(ReplicaTarget(rid))
            found[report["replica"]] = report
        return found

    def _replica_ids(self) -> frozenset[str]:
        from moestack.routing.router import ROUTERS

        router = ROUTERS.get((self.handle.app_name, MODEL))
        return router.replica_ids if router is not None else frozenset()

    async def complete(self, prompt: str = "hello there", max_tokens: int = 4,
                       stream: bool = False) -> Answer:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        response = await self.http.post("/v1/completions", json=body)
        return read_answer(response, stream)

    async def delete(self):
        await self.http.aclose()
        await asyncio.to_thread(self.serve.delete, self.app)


async def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def test_routing_spreads_concurrent_load_over_replicas(serve_cluster):
    d = Deployed(serve_cluster, "spread", num_replicas=3, fake={"token_interval_s": 0.02})
    try:
        before = await d.reports(3)  # also connects the handle to every replica
        assert all(r["requests"] == 0 for r in before.values())
        answers = await asyncio.gather(*(d.complete(f"hello {i}", max_tokens=20)
                                         for i in range(30)))
        assert all(a.status == 200 and a.finish_reason == "length" for a in answers)
        assert all(a.usage.completion_tokens == 20 for a in answers)
        served = {r: rep["requests"] for r, rep in (await d.reports(3)).items()}
        assert len(served) == 3 and sum(served.values()) == 30
        assert min(served.values()) >= 6, served
    finally:
        await d.delete()


async def test_prefix_affinity_raises_prefix_cache_hits_across_replicas(serve_cluster):
    prefixes = [" ".join(f"system{f}word{i}" for i in range(100)) for f in range(4)]
    prompts = [f"{prefixes[i % 4]} question {i}" for i in range(24)]
    hit_ratio = {}
    for policy in ("least_outstanding_tokens", "prefix_affinity"):
        d = Deployed(serve_cluster, f"prefix-{policy[:6]}", num_replicas=3,
                     routing={"policy": policy},
                     fake={"prefix_cache_tokens": 100_000, "prefix_block_tokens": 16})
        try:
            answers = [await d.complete(p) for p in prompts]
            usages = [a.usage for a in answers]
            hit_ratio[policy] = (sum(u.cached_prompt_tokens for u in usages)
                                 / sum(u.prompt_tokens for u in usages))
            # The gateway's records carry the engine's cached-token counts too.
            assert sum(r.cached_prompt_tokens for r in d.records.items) == sum(
                u.cached_prompt_tokens for u in usages)
        finally:
            await d.delete()
    assert hit_ratio["prefix_affinity"] > 0.7, hit_ratio
    assert hit_ratio["prefix_affinity"] > hit_ratio["least_outstanding_tokens"] + 0.15, hit_ratio


async def test_scale_down_and_rollout_drain_in_flight_streams_without_dropping_any(serve_cluster):
    d = Deployed(serve_cluster, "drain", num_replicas=3,
                 fake={"token_interval_s": 0.1}, autoscaling={"drain_timeout_s": 60})
    try:
        streams = [asyncio.create_task(d.complete(f"drain {i}", max_tokens=40, stream=True))
                   for i in range(9)]
        await asyncio.sleep(1.0)
        await d.redeploy(num_replicas=1)
        await wait_until(lambda: d.running_replicas() == 1, 60, "scale-down to one replica")
        answers = await asyncio.gather(*streams)
        assert [(a.error, a.usage.completion_tokens) for a in answers] == [(None, 40)] * 9
        # Rollout: a new replica version replaces the old one while it streams.
        streams = [asyncio.create_task(d.complete(f"roll {i}", max_tokens=40, stream=True))
                   for i in range(3)]
        await asyncio.sleep(1.0)
        await d.redeploy(num_replicas=1, env={"MOESTACK_ROLLOUT": "2"})
        answers = await asyncio.gather(*streams)
        assert [(a.error, a.usage.completion_tokens) for a in answers] == [(None, 40)] * 3
        assert len(d.records.items) == 12 and {r.status_code for r in d.records.items} == {200}
        assert [r.completion_tokens for r in d.records.items] == [40] * 12
        assert (await d.complete("after")).finish_reason == "length"
    finally:
        await d.delete()


async def test_autoscaling_follows_load_up_and_back_down(serve_cluster):
    d = Deployed(serve_cluster, "autoscale", fake={"token_interval_s": 0.05},
                 autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 3,
                              "target_ongoing_requests": 2, "look_back_period_s": 1,
                              "downscale_delay_s": 2})
    try:
        assert d.running_replicas() == 1
        load = [asyncio.create_task(d.complete(f"load {i}", max_tokens=300)) for i in range(8)]
        await wait_until(lambda: d.running_replicas() == 3, 60, "scale-up to 3 replicas")
        answers = await asyncio.gather(*load)
        assert all(a.usage.completion_tokens == 300 for a in answers)
        await wait_until(lambda: d.running_replicas() == 1, 90, "scale-down to 1 replica")
    finally:
        await d.delete()


async def test_gateway_fair_queue_depth_scales_the_model_and_its_slots_up(
        serve_cluster, proxy_port, tmp_path):
    """Replicas take 2 requests each, so the gateway hands Serve 2 per replica and keeps the
    rest in its fair queue: Serve alone sees one replica's target. The queue depth reaches the
    autoscaler through the board, the model scales up, and the gateway's slots follow."""
    from openai import AsyncOpenAI
    from prometheus_client.parser import text_string_to_metric_families

    from moestack.serve.app import build_app
    from moestack.tenancy.store import TenancyStore

    url = f"sqlite:///{tmp_path}/tenancy.db"
    store = TenancyStore.open(url)
    _, key = store.create_tenant("team")
    store.close()
    config = fake_config(
        fake_model(MODEL, cpus_per_worker=0.1, max_model_len=4096, max_ongoing_requests=2,
                   fake={"token_interval_s": 0.05},
                   autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 3,
                                "target_ongoing_requests": 2, "look_back_period_s": 1,
                                "downscale_delay_s": 600}),
        storage={"url": url}, tenancy={"enabled": True, "bootstrap_tenant": None,
                                       # slots = replicas x batch exactly (no headroom)
                                       "fair_queue": {"headroom_ratio": 0}},
        gateway={"operator_port": free_port()})
    serve_cluster.run(build_app(config), name="queued", route_prefix="/queued")
    base = f"http://127.0.0.1:{proxy_port}/queued"
    operator = f"http://127.0.0.1:{config.gateway.operator_port}"  # the gateway's own port

    def gauge(name: str) -> float:
        """The model's samples of ``name`` on the gateway's /metrics, summed over labels."""
        text = httpx.get(f"{operator}/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and s.labels.get("model") == MODEL)

    def running() -> int:
        status = serve_cluster.status().applications["queued"]
        return status.deployments[f"ModelServer:{MODEL}"].replica_states.get("RUNNING", 0)

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key.plaintext, max_retries=0)
    try:
        assert running() == 1 and gauge("moestack_queue_slots_requests") == 2
        load = [asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=100))
            for i in range(12)]
        await wait_until(lambda: running() == 3, 60, "scale-up on the gateway queue depth")
        await wait_until(lambda: gauge("moestack_queue_slots_requests") == 6, 30,
                         "the fair queue's slots to follow the 3 replicas")
        assert gauge("moestack_model_replicas") == 3
        done = await asyncio.gather(*load)
        assert [c.usage.completion_tokens for c in done] == [100] * 12
        assert gauge("moestack_routed_requests_total") == 12  # each routed once (hit + miss)
        assert gauge("moestack_failover_retries_total") == 0
    finally:
        await client.close()
        serve_cluster.delete("queued")


async def test_scaled_to_zero_model_queues_the_first_request_through_cold_start(serve_cluster):
    d = Deployed(serve_cluster, "zero", autoscaling={
        "enabled": True, "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
        "look_back_period_s": 1})
    try:
        assert d.running_replicas() == 0
        answer = await asyncio.wait_for(d.complete("cold"), timeout=60)
        assert answer.finish_reason == "length" and d.running_replicas() == 1
    finally:
        await d.delete()


async def test_killed_replica_loses_no_request_that_had_not_streamed(serve_cluster):
    import ray

    d = Deployed(serve_cluster, "failover", num_replicas=2, fake={"ttft_s": 4.0})
    try:
        await d.reports(2)  # connects the handle to both replicas: requests spread over them
        pending = [asyncio.create_task(d.complete(f"fail {i}")) for i in range(6)]
        await asyncio.sleep(1.5)
        victim = d.replica_names()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        answers = await asyncio.gather(*pending)
        assert all(a.status == 200 and a.finish_reason == "length" for a in answers), answers
        assert d.backend.failovers[MODEL] >= 1  # the victim held some of them
        records = Counter(r.request_id for r in d.records.items)
        assert records == Counter(a.request_id for a in answers)  # one usage record each
        assert {r.status_code for r in d.records.items} == {200}
    finally:
        await d.delete()


async def test_killed_replica_ends_streaming_requests_with_one_error_each(serve_cluster):
    import ray

    d = Deployed(serve_cluster, "midstream", num_replicas=2, fake={"token_interval_s": 0.1})
    try:
        await d.reports(2)
        streams = [asyncio.create_task(d.complete(f"mid {i}", max_tokens=100, stream=True))
                   for i in range(6)]
        # Kill once every stream has its first chunk (replicas count a request at its first).
        deadline = time.monotonic() + 30
        while sum(r["requests"] for r in (await d.reports(2)).values()) < 6:
            assert time.monotonic() < deadline, "streams did not start"
            await asyncio.sleep(0.2)
        for name in d.replica_names()[:1]:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        answers = await asyncio.gather(*streams)
        outcomes = ["error" if a.error else a.usage.completion_tokens for a in answers]
        assert "error" in outcomes and 100 in outcomes, outcomes
        assert set(outcomes) == {"error", 100}, outcomes
        records = {r.request_id: r for r in d.records.items}
        assert len(d.records.items) == 6 == len(records)
        for answer, outcome in zip(answers, outcomes):
            rec = records[answer.request_id]
            assert answer.status == 200  # the stream had started: the error is its last event
            if outcome == "error":
                assert answer.error["code"] == "engine_unavailable", answer.error
                assert rec.status_code == 503 and 0 < rec.completion_tokens < 100
            else:
                assert rec.status_code == 200 and rec.completion_tokens == 100
    finally:
        await d.delete()


async def _adapter_answers(d: Deployed, n: int, concurrent: bool) -> list[int]:
    """``n`` completions naming adapter ``sql-helper`` through the ServeBackend; their statuses."""
    import dataclasses

    from moestack.engine.protocol import AdapterRef
    from moestack.testing.requests import engine_request

    ref = AdapterRef("sql-helper", "/adapters/sql-helper")

    async def one(i: int) -> int:
        request = engine_request({"model": "sql-helper", "prompt": f"hello {i}",
                                  "max_tokens": 10}, max_model_len=4096)
        chunks = [c async for c in d.backend.serve(MODEL, dataclasses.replace(request,
                                                                              adapter=ref))]
        assert b"sql-helper.tok1" in b"".join(c.data for c in chunks)
        return chunks[0].status
    if concurrent:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    return [await one(i) for i in range(n)]


async def test_adapter_affinity_keeps_an_adapter_on_the_replica_that_loaded_it(serve_cluster):
    d = Deployed(serve_cluster, "adapter-affinity", num_replicas=3,
                 engine_args={"enable_lora": True, "max_loras": 2})
    try:
        await d.reports(3)
        assert await _adapter_answers(d, 6, concurrent=False) == [200] * 6
        reports = (await d.reports(3)).values()
        assert sorted(r["requests"] for r in reports) == [0, 0, 6]
        assert [r["adapter_loads"] for r in reports if r["requests"]] == [{"sql-helper": 1}]
    finally:
        await d.delete()


async def test_adapter_removal_reaches_every_replica(serve_cluster):
    d = Deployed(serve_cluster, "adapter-removal", num_replicas=3,
                 engine_args={"enable_lora": True, "max_loras": 2},
                 routing={"adapter_affinity": False}, fake={"token_interval_s": 0.02})
    try:
        await d.reports(3)
        assert await _adapter_answers(d, 12, concurrent=True) == [200] * 12
        reports = (await d.reports(3)).values()
        holders = [r for r in reports if r["adapters"] == ["sql-helper"]]
        assert len(holders) >= 2, reports  # spread over replicas, each loaded it once
        assert all(r["adapter_loads"] == {"sql-helper": 1} for r in holders)
        # The replicas' reports reach this process's request router (Serve's routing stats).
        from moestack.routing.router import ROUTERS

        router = ROUTERS[(d.app, MODEL)]
        await wait_until(lambda: sum("sql-helper" in (router.adapters.reported(rid) or ())
                                     for rid in router.replica_ids) == len(holders), 30,
                         "the replicas' adapter reports")
        await d.backend.remove_adapter(MODEL, "sql-helper")
        assert all(r["adapters"] == [] for r in (await d.reports(3)).values())
        assert router.adapters.holders("sql-helper", router.replica_ids) == []
    finally:
        await d.delete()
