"""Report figures: vLLM-bench definitions, goodput under SLO, Jain's index, USD vs baselines."""

import pytest

from moestack.loadtest import RequestResult, jain_index, parse_scenario, summarize
from moestack.loadtest.report import distribution
from moestack.metering.pricing import load_pricing


def scenario(**over):
    raw = {"name": "t", "model": "m", "num_requests": 4,
           "tenants": [{"name": "a", "weight": 2}, {"name": "b", "weight": 1}],
           "prompt_tokens": {"mean": 10}, "output_tokens": {"mean": 5}}
    raw.update(over)
    return parse_scenario(raw)


def result(i, tenant="a", ttft=0.1, itl=(0.02, 0.02, 0.02, 0.02), prompt=10, completion=5,
           status=200, error=None):
    e2e = ttft + sum(itl)
    return RequestResult(index=i, tenant=tenant, sent_s=0.0, status=status, ttft_s=ttft,
                         itl_s=list(itl), e2e_s=e2e, prompt_tokens=prompt,
                         completion_tokens=completion, text_chunks=len(itl) + 1, error=error)


def test_tpot_excludes_the_first_token():
    r = result(0, ttft=0.5, itl=(0.1, 0.1, 0.1, 0.1), completion=5)
    assert r.tpot_s == pytest.approx(0.1)
    assert result(1, itl=(), completion=1).tpot_s is None


def test_percentiles_interpolate_linearly_like_numpy():
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d["p50"] == 2.5 and d["p90"] == pytest.approx(3.7) and d["max"] == 4.0
    assert distribution([])["p99"] is None


def test_jain_index_is_one_when_equal_and_one_over_n_when_one_takes_all():
    assert jain_index([3, 3, 3]) == pytest.approx(1.0)
    assert jain_index([9, 0, 0]) == pytest.approx(1 / 3)
    assert jain_index([2, 1]) == pytest.approx(0.9)


def test_summary_counts_failures_and_keeps_them_out_of_latency():
    results = [result(0), result(1, ttft=0.3),
               result(2, status=429, error="rate_limit_exceeded: slow down", completion=0),
               result(3, status=0, error="ConnectError: refused", completion=0)]
    rep = summarize(scenario(), results, duration_s=2.0)
    assert rep["requests"] == {"sent": 4, "completed": 2, "failed": 2,
                               "errors": {"429 rate_limit_exceeded": 1, "ConnectError": 1}}
    assert rep["latency_s"]["ttft"]["count"] == 2
    assert rep["latency_s"]["ttft"]["mean"] == pytest.approx(0.2)
    assert rep["latency_s"]["itl"]["count"] == 8
    assert rep["throughput"]["requests_per_s"] == pytest.approx(1.0)
    assert rep["throughput"]["output_tokens_per_s"] == pytest.approx(5.0)
    assert rep["throughput"]["total_tokens_per_s"] == pytest.approx(15.0)


def test_goodput_counts_only_requests_meeting_every_slo():
    results = [result(0, ttft=0.1), result(1, ttft=0.4), result(2, ttft=0.1, itl=(0.2,) * 4)]
    rep = summarize(scenario(slo={"ttft_s": 0.2, "tpot_s": 0.05}), results, duration_s=1.0)
    assert rep["throughput"]["goodput_requests_per_s"] == pytest.approx(1.0)
    assert rep["slo"]["attainment"] == pytest.approx(1 / 3)


def test_fairness_compares_token_share_with_weight_share():
    # a has weight 2 and gets twice b's tokens: perfectly weighted-fair.
    results = [result(0, "a", prompt=20, completion=10), result(1, "b", prompt=10, completion=5)]
    fair = summarize(scenario(), results, 1.0)["fairness"]
    assert fair["jain_index"] == pytest.approx(1.0)
    assert fair["tenants"]["a"]["token_share"] == pytest.approx(2 / 3)
    assert fair["tenants"]["a"]["weight_share"] == pytest.approx(2 / 3)
    unfair = summarize(scenario(), [result(0, "b", prompt=20, completion=10),
                                    result(1, "a", prompt=10, completion=5)], 1.0)["fairness"]
    assert unfair["jain_index"] < 0.8


def test_cost_prices_tokens_at_every_baseline_and_self_hosted_from_gpu_hours():
    catalog = load_pricing()
    results = [result(0, prompt=600_000, completion=400_000)]
    rep = summarize(scenario(cost={"accelerator": "H100", "accelerator_count": 8}), results,
                    duration_s=3600.0, catalog=catalog)
    cost = rep["cost"]
    assert cost["deployment_usd_per_hour"] == pytest.approx(8 * catalog.usd_per_gpu_hour("H100"))
    assert cost["self_hosted_usd_per_1m_tokens"] == pytest.approx(cost["self_hosted_usd"])
    assert set(cost["baselines"]) == set(catalog.baselines)
    for name, b in cost["baselines"].items():
        price = catalog.baselines[name]
        expected = 0.6 * price.usd_per_1m_input_tokens + 0.4 * price.usd_per_1m_output_tokens
        assert b["usd_per_1m_tokens"] == pytest.approx(expected)
        assert b["self_hosted_cost_ratio"] == pytest.approx(
            cost["self_hosted_usd_per_1m_tokens"] / expected)


def test_cost_without_deployment_price_reports_baselines_only():
    rep = summarize(scenario(), [result(0)], 1.0, catalog=load_pricing())
    assert rep["cost"]["self_hosted_usd_per_1m_tokens"] is None
    assert all(b["usd_per_1m_tokens"] > 0 for b in rep["cost"]["baselines"].values())
