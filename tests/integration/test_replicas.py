"""Several ModelServer replicas (fake engine) on a real Ray Serve: routing, autoscaling, drain and
failover through the gateway's ServeBackend. One Ray cluster for the module; each test deploys
and deletes its own application."""

import asyncio
import os
import shutil
import time
from collections import Counter

import pytest

from moestack.api.generation import GenerationService
from moestack.config.schema import ModelConfig
from moestack.engine import GenerationRequest, SamplingOptions
from moestack.errors import EngineUnavailableError
from moestack.testing import fake_config, fake_model
from moestack.testing.stack_process import free_port, short_temp_dir

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


class Deployed:
    """One model's ModelServer deployment, reached like the gateway reaches it."""

    def __init__(self, serve, app: str, **model):
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
        self.service = GenerationService(self.config, self.backend, [self.records])

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
        """Each replica's report; calls at random replicas until all ``expected`` answered."""
        found = {}
        for _ in range(60):
            report = await self.handle.replica_report.remote()
            found[report["replica"]] = report
            if len(found) == expected:
                break
        return found

    async def complete(self, rid: str, prompt: str = "hello there", max_tokens: int = 4):
        text, last = await self.service.complete(MODEL, request(rid, prompt, max_tokens), "t")
        return last

    def delete(self):
        self.serve.delete(self.app)


def request(rid: str, prompt: str = "hello there", max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(rid, prompt=prompt, sampling=SamplingOptions(max_tokens=max_tokens))


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
        lasts = await asyncio.gather(*(d.complete(f"s{i}", max_tokens=20) for i in range(30)))
        assert all(last.finish_reason == "length" for last in lasts)
        served = {r: rep["requests"] for r, rep in (await d.reports(3)).items()}
        assert len(served) == 3 and sum(served.values()) == 30
        assert min(served.values()) >= 6, served
    finally:
        d.delete()


async def test_prefix_affinity_raises_prefix_cache_hits_across_replicas(serve_cluster):
    prefixes = [" ".join(f"system{f}word{i}" for i in range(100)) for f in range(4)]
    prompts = [f"{prefixes[i % 4]} question {i}" for i in range(24)]
    hit_ratio = {}
    for policy in ("least_outstanding_tokens", "prefix_affinity"):
        d = Deployed(serve_cluster, f"prefix-{policy[:6]}", num_replicas=3,
                     routing={"policy": policy},
                     fake={"prefix_cache_tokens": 100_000, "prefix_block_tokens": 16})
        try:
            lasts = [await d.complete(f"p{i}", p) for i, p in enumerate(prompts)]
            hit_ratio[policy] = (sum(c.cached_prompt_tokens for c in lasts)
                                 / sum(c.prompt_tokens for c in lasts))
        finally:
            d.delete()
    assert hit_ratio["prefix_affinity"] > 0.7, hit_ratio
    assert hit_ratio["prefix_affinity"] > hit_ratio["least_outstanding_tokens"] + 0.15, hit_ratio


async def test_scale_down_and_rollout_drain_in_flight_streams_without_dropping_any(serve_cluster):
    d = Deployed(serve_cluster, "drain", num_replicas=3,
                 fake={"token_interval_s": 0.1}, autoscaling={"drain_timeout_s": 60})
    try:
        streams = [asyncio.create_task(d.complete(f"d{i}", max_tokens=40)) for i in range(9)]
        await asyncio.sleep(1.0)
        await d.redeploy(num_replicas=1)
        await wait_until(lambda: d.running_replicas() == 1, 60, "scale-down to one replica")
        lasts = await asyncio.gather(*streams)
        assert [c.completion_tokens for c in lasts] == [40] * 9
        # Rollout: a new replica version replaces the old one while it streams.
        streams = [asyncio.create_task(d.complete(f"u{i}", max_tokens=40)) for i in range(3)]
        await asyncio.sleep(1.0)
        await d.redeploy(num_replicas=1, env={"MOESTACK_ROLLOUT": "2"})
        lasts = await asyncio.gather(*streams)
        assert [c.completion_tokens for c in lasts] == [40] * 3
        assert len(d.records.items) == 12 and {r.status_code for r in d.records.items} == {200}
        assert (await d.complete("after")).finish_reason == "length"
    finally:
        d.delete()


async def test_autoscaling_follows_load_up_and_back_down(serve_cluster):
    d = Deployed(serve_cluster, "autoscale", fake={"token_interval_s": 0.05},
                 autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 3,
                              "target_ongoing_requests": 2, "look_back_period_s": 1,
                              "downscale_delay_s": 2})
    try:
        assert d.running_replicas() == 1
        load = [asyncio.create_task(d.complete(f"a{i}", max_tokens=300)) for i in range(8)]
        await wait_until(lambda: d.running_replicas() == 3, 60, "scale-up to 3 replicas")
        lasts = await asyncio.gather(*load)
        assert all(c.completion_tokens == 300 for c in lasts)
        await wait_until(lambda: d.running_replicas() == 1, 90, "scale-down to 1 replica")
    finally:
        d.delete()


async def test_gateway_fair_queue_depth_scales_the_model_and_its_slots_up(
        serve_cluster, proxy_port, tmp_path):
    """Replicas take 2 requests each, so the gateway hands Serve 2 per replica and keeps the
    rest in its fair queue: Serve alone sees one replica's target. The queue depth reaches the
    autoscaler through the board, the model scales up, and the gateway's slots follow."""
    import httpx
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
        storage={"url": url}, tenancy={"enabled": True, "bootstrap_tenant": None},
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
        last = await asyncio.wait_for(d.complete("cold"), timeout=60)
        assert last.finish_reason == "length" and d.running_replicas() == 1
    finally:
        d.delete()


async def test_killed_replica_loses_no_request_that_had_not_streamed(serve_cluster):
    import ray

    d = Deployed(serve_cluster, "failover", num_replicas=2, fake={"ttft_s": 4.0})
    try:
        pending = [asyncio.create_task(d.complete(f"f{i}")) for i in range(6)]
        await asyncio.sleep(1.5)
        victim = d.replica_names()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        lasts = await asyncio.gather(*pending)
        assert all(c.finish_reason == "length" for c in lasts)
        records = Counter(r.request_id for r in d.records.items)
        assert records == Counter(f"f{i}" for i in range(6))  # one usage record each
        assert {r.status_code for r in d.records.items} == {200}
    finally:
        d.delete()


async def test_killed_replica_ends_streaming_requests_with_one_error_each(serve_cluster):
    import ray

    d = Deployed(serve_cluster, "midstream", num_replicas=2, fake={"token_interval_s": 0.1})
    try:
        streams = [await d.service.open_stream(MODEL, request(f"m{i}", max_tokens=100), "t",
                                               stream=True) for i in range(6)]
        for name in d.replica_names()[:1]:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

        async def drain(stream):
            try:
                return [c async for c in stream][-1].completion_tokens
            except EngineUnavailableError:
                return "error"
        outcomes = await asyncio.gather(*(drain(s) for s in streams))
        assert "error" in outcomes and 100 in outcomes, outcomes
        records = {r.request_id: r for r in d.records.items}
        assert len(d.records.items) == 6 == len(records)
        for i, outcome in enumerate(outcomes):
            rec = records[f"m{i}"]
            if outcome == "error":
                assert rec.status_code == 503 and 0 < rec.completion_tokens < 100
            else:
                assert rec.status_code == 200 and rec.completion_tokens == 100
    finally:
        d.delete()
