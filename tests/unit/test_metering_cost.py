"""The cost model, provisioned resources, the cost accountant's conservation law, and metrics."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moestack.config import parse_config
from moestack.errors import ConfigError
from moestack.metering.cost import (
    CostAccountant,
    CostModel,
    ProvisionedResources,
    replica_usd_per_hour,
)
from moestack.metering.metrics import GatewayMetrics
from moestack.metering.pricing import load_pricing
from moestack.usage import RequestRecord

CATALOG = load_pricing()


def _config(**extra):
    raw = {"models": [{"name": "m", "engine": "fake"},
                      {"name": "g", "engine": "fake", "accelerator": "gpu",
                       "gpu": "h100", "num_replicas": 2,
                       "parallelism": {"tensor_parallel_size": 8}}],
           "cost": {"engine_token_cost": {"g": {"prefill_s_per_token": 0.001,
                                                "decode_s_per_token": 0.01}}}}
    raw.update(extra)
    return parse_config(raw)


def _rec(model="g", prompt=1000, cached=200, completion=100, tenant="acme", status=200):
    return RequestRecord(request_id="r", model=model, endpoint="chat.completions", stream=False,
                         status_code=status, prompt_tokens=prompt, completion_tokens=completion,
                         cached_prompt_tokens=cached, ttft_s=0.5, e2e_s=2.48, tenant=tenant)


def test_request_pays_uncached_prefill_and_decode_at_the_replica_rate():
    model = CostModel(_config(), CATALOG)
    cost = model.price(_rec())
    assert cost.engine_s == pytest.approx(800 * 0.001 + 100 * 0.01)
    replica_usd_per_s = 8 * CATALOG.usd_per_gpu_hour("H100") / 3600
    assert cost.self_hosted_usd == pytest.approx(1.8 * replica_usd_per_s)


def test_request_is_priced_at_every_baseline_with_cached_input_rate():
    cost = CostModel(_config(), CATALOG).price(_rec())
    assert set(cost.baseline_usd) == set(CATALOG.baselines)
    assert cost.baseline_usd["gpt-5.5"] == pytest.approx((800 * 5 + 200 * 0.5 + 100 * 30) / 1e6)
    assert cost.baseline_usd["deepseek-v4-flash"] == pytest.approx(
        (800 * 0.14 + 200 * 0.0028 + 100 * 0.28) / 1e6)


def test_cpu_replica_is_priced_per_cpu():
    config = _config()
    assert replica_usd_per_hour(config.model("m"), CATALOG) == CATALOG.usd_per_gpu_hour("cpu")


def test_gpu_model_without_gpu_kind_is_a_config_error():
    config = parse_config({"models": [{"name": "x", "engine": "fake", "accelerator": "gpu"}]})
    with pytest.raises(ConfigError, match=r"models\[x\]\.gpu"):
        CostModel(config, CATALOG)


def test_ray_nodes_count_alive_gpus_by_kind_and_cpus_of_cpu_nodes():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 208.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},
        {"Alive": True, "Resources": {"CPU": 208.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},
        {"Alive": True, "Resources": {"CPU": 96.0, "GPU": 4.0, "accelerator_type:L40S": 1.0}},
        {"Alive": True, "Resources": {"CPU": 16.0}},
        {"Alive": False, "Resources": {"CPU": 208.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},
    ]
    res = ProvisionedResources.from_ray_nodes(nodes)
    assert res.gpus == {"H100": 16.0, "L40S": 4.0}
    assert res.cpus == 16.0
    assert res.usd_per_hour(CATALOG) == pytest.approx(
        16 * CATALOG.usd_per_gpu_hour("H100") + 4 * CATALOG.usd_per_gpu_hour("L40S")
        + 16 * CATALOG.usd_per_gpu_hour("cpu"))


def test_provisioned_from_config_counts_every_replica():
    res = ProvisionedResources.from_config(_config())
    assert res.gpus == {"H100": 16} and res.cpus == 1.0


def test_work_below_cluster_cost_is_paid_in_full_and_the_rest_is_idle():
    acc = CostAccountant()
    acc.add_work("a", "m", 1.0)
    acc.add_work("b", "m", 2.0)
    done = acc.split(10.0)
    assert done.tenant_usd == {("a", "m"): 1.0, ("b", "m"): 2.0}
    assert done.idle_usd == 7.0


def test_work_above_cluster_cost_shares_it_in_proportion_with_no_idle():
    acc = CostAccountant()
    acc.add_work("a", "m", 3.0)
    acc.add_work("b", "m", 9.0)
    done = acc.split(6.0)
    assert done.tenant_usd == {("a", "m"): 1.5, ("b", "m"): 4.5}
    assert done.idle_usd == 0.0


def test_tenant_costs_plus_idle_equal_cluster_cost_over_random_periods():
    rng = random.Random(7)
    acc = CostAccountant()
    tenant_usd = idle_usd = cluster_usd = 0.0  # what the Prometheus counters accumulate
    for _ in range(500):
        for _ in range(rng.randrange(0, 20)):
            acc.add_work(rng.choice("abcde"), rng.choice(["m", "g"]), rng.expovariate(10))
        done = acc.split(rng.uniform(0, 2))
        assert sum(done.tenant_usd.values()) + done.idle_usd == pytest.approx(done.cluster_usd)
        tenant_usd += sum(done.tenant_usd.values())
        idle_usd += done.idle_usd
        cluster_usd += done.cluster_usd
    assert tenant_usd + idle_usd == pytest.approx(cluster_usd, rel=1e-12)


def _count(metrics: GatewayMetrics, rec: RequestRecord) -> None:
    """Record ``rec`` priced once, as the metering hook does."""
    metrics.record(rec, metrics.cost_model.price(rec))


def _samples(metrics: GatewayMetrics) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_conserve_cluster_cost_across_scrapes():
    now = [0.0]
    config = _config(tenancy={"prices": {"g": {"usd_per_1m_prompt_tokens": 1.0,
                                                "usd_per_1m_completion_tokens": 2.0}}})
    metrics = GatewayMetrics(config=config, clock=lambda: now[0])
    _count(metrics, _rec(tenant="acme"))
    _count(metrics, _rec(tenant="beta", completion=300))
    now[0] = 3600.0
    s = _samples(metrics)
    cluster = s[("moestack_cluster_cost_usd_total", ())]
    assert cluster == pytest.approx(16 * CATALOG.usd_per_gpu_hour("H100")
                                    + CATALOG.usd_per_gpu_hour("cpu"))
    tenants = {k: v for k, v in s.items() if k[0] == "moestack_tenant_cost_usd_total"}
    assert len(tenants) == 2
    assert sum(tenants.values()) + s[("moestack_idle_cost_usd_total", ())] == pytest.approx(cluster)
    assert s[("moestack_tenant_charged_usd_total", (("model", "g"), ("tenant", "beta")))] == \
        pytest.approx((1000 * 1.0 + 300 * 2.0) / 1e6)
    assert s[("moestack_baseline_cost_usd_total", (("baseline", "gpt-5.5"), ("tenant", "acme")))] \
        == pytest.approx((800 * 5 + 200 * 0.5 + 100 * 30) / 1e6)
    assert s[("moestack_cluster_gpus", (("accelerator", "H100"),))] == 16
    assert s[("moestack_model_gpus", (("model", "g"),))] == 16


def test_itl_is_the_mean_gap_after_the_first_token():
    metrics = GatewayMetrics(config=_config())
    _count(metrics, _rec(completion=100))  # (2.48 - 0.5) / 99 = 0.02 s
    s = _samples(metrics)
    assert s[("moestack_inter_token_latency_seconds_sum", (("model", "g"),))] == pytest.approx(0.02)
    bucket = "moestack_inter_token_latency_seconds_bucket"
    assert s[(bucket, (("le", "0.025"), ("model", "g")))] == 1
    assert s[(bucket, (("le", "0.01"), ("model", "g")))] == 0


def test_queue_depth_is_read_at_scrape_time():
    metrics = GatewayMetrics(config=_config())
    depth = [3]
    metrics.track_queue_depth("g", lambda: depth[0], lambda: 16)
    assert _samples(metrics)[("moestack_queue_depth_requests", (("model", "g"),))] == 3
    depth[0] = 0
    assert _samples(metrics)[("moestack_queue_depth_requests", (("model", "g"),))] == 0
    assert _samples(metrics)[("moestack_queue_slots_requests", (("model", "g"),))] == 16


def test_routing_counts_and_live_replicas_are_read_from_the_router_at_scrape_time():
    from moestack.usage import RoutingCounts

    metrics = GatewayMetrics(config=_config())
    counts: list[RoutingCounts | None] = [None]
    failovers = [0]
    metrics.track_routing("g", lambda: counts[0], lambda: failovers[0])
    s = _samples(metrics)
    assert s[("moestack_model_replicas", (("model", "g"),))] == 2  # configured, until told
    assert ("moestack_routed_requests_total", (("model", "g"), ("prefix", "hit"))) not in s
    counts[0] = RoutingCounts(requests=10, prefix_hits=7, prompt_blocks=40, matched_blocks=25,
                              live_replicas=3)
    failovers[0] = 2
    s = _samples(metrics)
    assert s[("moestack_model_replicas", (("model", "g"),))] == 3
    assert s[("moestack_model_gpus", (("model", "g"),))] == 24  # 3 replicas x TP 8
    assert s[("moestack_routed_requests_total", (("model", "g"), ("prefix", "hit")))] == 7
    assert s[("moestack_routed_requests_total", (("model", "g"), ("prefix", "miss")))] == 3
    assert s[("moestack_routed_prefix_blocks_total", (("kind", "matched"), ("model", "g")))] == 25
    assert s[("moestack_failover_retries_total", (("model", "g"),))] == 2


def test_gateway_replicas_each_accrue_their_share():
    now = [0.0]
    config = _config(gateway={"num_replicas": 4})
    metrics = GatewayMetrics(config=config, clock=lambda: now[0])
    now[0] = 3600.0
    s = _samples(metrics)
    full = ProvisionedResources.from_config(config).usd_per_hour(CATALOG)
    assert s[("moestack_cluster_cost_usd_total", ())] == pytest.approx(full / 4)
    assert s[("moestack_idle_cost_usd_total", ())] == pytest.approx(full / 4)


def test_cluster_cost_follows_what_ray_reports_when_connected(monkeypatch):
    import types

    nodes = [{"Alive": True, "Resources": {"CPU": 208.0, "GPU": 8.0,
                                           "accelerator_type:H200": 1.0}}]
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, nodes=lambda: nodes)
    monkeypatch.setitem(__import__("sys").modules, "ray", fake_ray)
    now = [0.0]
    metrics = GatewayMetrics(config=_config(), clock=lambda: now[0])
    now[0] = 3600.0
    s = _samples(metrics)
    assert s[("moestack_cluster_cost_usd_total", ())] == pytest.approx(
        8 * CATALOG.usd_per_gpu_hour("H200"))
    assert s[("moestack_cluster_gpus", (("accelerator", "H200"),))] == 8
