"""GatewayMetrics.record keeps each label combination's series at hand: the counts must be those
of one ``labels()`` lookup per series, past the bound of what it keeps too."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moestack.config import parse_config
from moestack.metering import metrics as metrics_module
from moestack.metering.metrics import GatewayMetrics
from moestack.usage import RequestRecord


def _samples(metrics: GatewayMetrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(metrics.exposition().decode())
            for s in fam.samples}


def _rec(tenant: str, status: int = 200, ttft_s: float | None = 0.1) -> RequestRecord:
    return RequestRecord(request_id="r", model="m", endpoint="chat.completions", stream=True,
                         status_code=status, prompt_tokens=10, completion_tokens=5,
                         cached_prompt_tokens=2, ttft_s=ttft_s, e2e_s=0.5, tenant=tenant)


def test_each_tenant_and_status_counts_in_its_own_series_past_the_kept_bound(monkeypatch):
    monkeypatch.setattr(metrics_module, "SERIES_CACHE_SIZE", 3)
    metrics = GatewayMetrics(config=parse_config({"models": [{"name": "m", "engine": "fake"}]}))
    tenants = [f"t{i}" for i in range(7)]
    for _ in range(2):
        for t in tenants:
            metrics.record(_rec(t))
    metrics.record(_rec("t0", status=503, ttft_s=None))
    s = _samples(metrics)
    for t in tenants:
        labels = (("model", "m"), ("status", "200"), ("tenant", t))
        assert s[("moestack_tenant_requests_total", labels)] == 2
        assert s[("moestack_tenant_tokens_total",
                  (("kind", "completion"), ("model", "m"), ("tenant", t)))] == (
            15 if t == "t0" else 10)  # t0's 503 counts its tokens too
    assert s[("moestack_tenant_requests_total",
              (("model", "m"), ("status", "503"), ("tenant", "t0")))] == 1
    assert s[("moestack_requests_total", (("endpoint", "chat.completions"), ("model", "m"),
                                          ("status", "200")))] == 14
    assert s[("moestack_backend_tokens_total",
              (("backend", "replica"), ("kind", "prompt"), ("model", "m")))] == 150
    # Latency series count the requests that had a first token, E2E only the 200s.
    assert s[("moestack_time_to_first_token_seconds_count", (("model", "m"),))] == 14
    assert s[("moestack_e2e_request_latency_seconds_count", (("model", "m"),))] == 14
    assert s[("moestack_inter_token_latency_seconds_sum", (("model", "m"),))] == \
        pytest.approx(14 * 0.1)


def test_series_a_request_never_used_do_not_appear():
    metrics = GatewayMetrics(config=parse_config({"models": [{"name": "m", "engine": "fake"}]}))
    metrics.record(_rec("t", status=503, ttft_s=None))
    names = {name for name, _ in _samples(metrics)}
    assert "moestack_tenant_requests_total" in names
    assert "moestack_time_to_first_token_seconds_count" not in names
    assert "moestack_e2e_request_latency_seconds_count" not in names
    assert "moestack_tenant_charged_usd_total" not in names
