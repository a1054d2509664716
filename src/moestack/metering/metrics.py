"""All Prometheus metrics of the gateway, declared in one place (documented in METRICS.md)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from moestack.api.generation import RequestRecord

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Records every finished request; one instance (and registry) per gateway replica."""

    def __init__(self, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # `_created` series only add cardinality for our dashboards
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("moestack_requests", "Requests finished, by status code.",
                                ["model", "endpoint", "status"], registry=r)
        self.tokens = Counter("moestack_tokens", "Tokens processed, by kind "
                              "(prompt, cached_prompt, completion).", ["model", "kind"],
                              registry=r)
        self.ttft = Histogram("moestack_time_to_first_token_seconds", "Time to first token.",
                              ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("moestack_e2e_request_latency_seconds", "End-to-end latency.",
                             ["model"], buckets=LATENCY_BUCKETS_S, registry=r)

    def record(self, rec: RequestRecord) -> None:
        self.requests.labels(rec.model, rec.endpoint, str(rec.status_code)).inc()
        self.tokens.labels(rec.model, "prompt").inc(rec.prompt_tokens)
        self.tokens.labels(rec.model, "cached_prompt").inc(rec.cached_prompt_tokens)
        self.tokens.labels(rec.model, "completion").inc(rec.completion_tokens)
        if rec.ttft_s is not None:
            self.ttft.labels(rec.model).observe(rec.ttft_s)
        if rec.status_code == 200:
            self.e2e.labels(rec.model).observe(rec.e2e_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
