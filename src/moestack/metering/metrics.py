"""All Prometheus metrics of the gateway, declared in one place (documented in
``monitoring/METRICS.md``).

:class:`GatewayMetrics` records every finished request with its price (the metering hook,
:mod:`moestack.metering.hook`, prices it once with :class:`~moestack.metering.cost.CostModel`):
tokens, status, latencies, cost. At each scrape the cluster's provisioned cost since the previous
scrape is accrued and split (:class:`CostAccountant`) into tenant and idle cost, so
``cluster = sum(tenant) + idle`` holds in every scrape.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from moestack.config.schema import ModelConfig, MoestackConfig
from moestack.metering.cost import (
    NO_TENANT,
    CostAccountant,
    CostModel,
    CostSplit,
    ProvisionedResources,
)
from moestack.usage import RequestCost, RequestRecord, RoutingCounts

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

ResourceSource = Callable[[], ProvisionedResources]
TOKEN_KINDS = ("prompt", "cached_prompt", "completion")
SERIES_CACHE_SIZE = 4096
"""Label combinations (model, endpoint, status, tenant, backend) whose series
:meth:`GatewayMetrics.record` keeps at hand."""


class GatewayMetrics:
    """Records every finished request; one instance (and registry) per gateway replica.

    ``config`` enables cost metering: a cost model to price requests with (``cost_model``),
    per-tenant counters, and cluster cost accrued from ``resources()`` (what is provisioned;
    default: what Ray reports when this process is connected to Ray, else the configured
    replicas). With ``N`` gateway replicas each
    accrues ``1/N`` of the cluster, so sums over replicas give the cluster.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 config: MoestackConfig | None = None, *, cost_model: CostModel | None = None,
                 resources: ResourceSource | None = None,
                 clock: Callable[[], float] = time.monotonic):
        disable_created_metrics()  # `_created` series only add cardinality for our dashboards
        self.registry = registry or CollectorRegistry()
        self.config = config
        self.cost_model = cost_model or (CostModel.from_config(config) if config else None)
        self.accountant = CostAccountant()
        self._resources = resources or (_default_resources(config) if config else None)
        self._clock = clock
        self._last_accrual = clock()
        self._lock = threading.Lock()
        self._routing: dict[str, tuple[Callable[[], RoutingCounts | None],
                                       Callable[[], int]]] = {}
        self._fairness: dict[str, Callable[[], FairnessSource]] = {}
        self._request_series: dict[tuple[str, ...], _RequestSeries] = {}
        self._declare(self.registry)
        self.registry.register(_RoutingCollector(self._routing))
        self.registry.register(_FairnessCollector(self._fairness))
        if config is not None:
            for m in config.models:
                self._track_replicas(m, lambda m=m: m.initial_replicas)

    def _declare(self, r: CollectorRegistry) -> None:
        # -- requests and tokens -------------------------------------------------------------
        self.requests = Counter("moestack_requests", "Requests finished, by status code.",
                                ["model", "endpoint", "status"], registry=r)
        self.tokens = Counter("moestack_tokens", "Tokens processed, by kind "
                              "(prompt, cached_prompt, completion).", ["model", "kind"],
                              registry=r)
        self.tenant_requests = Counter("moestack_tenant_requests", "Requests finished per "
                                       "tenant, by status code.", ["tenant", "model", "status"],
                                       registry=r)
        self.rejections = Counter("moestack_tenant_rejections", "Requests refused before "
                                  "admission: 401 bad key, 403 model not allowed, 429 rate limit "
                                  "or budget.", ["tenant", "status"], registry=r)
        self.tenant_tokens = Counter("moestack_tenant_tokens", "Tokens per tenant, by kind "
                                     "(prompt, cached_prompt, completion).",
                                     ["tenant", "model", "kind"], registry=r)
        # -- LoRA adapters (the base model's series above count these requests too) ---------
        self.adapter_requests = Counter("moestack_adapter_requests", "Requests finished that "
                                        "ran with a LoRA adapter, by status code.",
                                        ["tenant", "model", "adapter", "status"], registry=r)
        self.adapter_tokens = Counter("moestack_adapter_tokens", "Tokens of requests that ran "
                                      "with a LoRA adapter, by kind (prompt, cached_prompt, "
                                      "completion).", ["tenant", "model", "adapter", "kind"],
                                      registry=r)
        self.adapter_cost = Counter("moestack_adapter_cost_usd", "Self-hosted cost (engine "
                                    "work) of requests that ran with a LoRA adapter.",
                                    ["tenant", "model", "adapter"], registry=r)
        self.adapter_charged = Counter("moestack_adapter_charged_usd", "What tenants were "
                                       "charged for requests that ran with a LoRA adapter.",
                                       ["tenant", "model", "adapter"], registry=r)
        # -- backends: self-hosted replica or overflow provider (provider:<name>) -----------
        self.backend_requests = Counter("moestack_backend_requests", "Requests finished, by "
                                        "the backend that answered (replica, provider:<name>).",
                                        ["backend", "model", "status"], registry=r)
        self.backend_tokens = Counter("moestack_backend_tokens", "Tokens by backend and kind "
                                      "(prompt, cached_prompt, completion).",
                                      ["backend", "model", "kind"], registry=r)
        self.backend_cost = Counter("moestack_backend_cost_usd", "What requests cost by backend: "
                                    "engine work at the replica's rate, or the provider's bill.",
                                    ["backend", "model"], registry=r)
        self.overflow_alternative = Counter("moestack_overflow_alternative_cost_usd", "What every "
                                            "request of a model with an overflow rule would have "
                                            "cost at its provider (all traffic to the API).",
                                            ["model", "provider"], registry=r)
        # -- latency and load ----------------------------------------------------------------
        self.ttft = Histogram("moestack_time_to_first_token_seconds", "Time to first token.",
                              ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("moestack_inter_token_latency_seconds", "Mean time between output "
                             "tokens of one request (one observation per request).", ["model"],
                             buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("moestack_e2e_request_latency_seconds", "End-to-end latency.",
                             ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("moestack_queue_depth_requests", "Requests waiting in the "
                                 "gateway's fair queue for a model.", ["model"], registry=r)
        self.queue_slots = Gauge("moestack_queue_slots_requests", "Requests the gateway sends "
                                 "to a model at once (fair-queue dispatch slots).", ["model"],
                                 registry=r)
        self.model_replicas = Gauge("moestack_model_replicas", "Engine replicas of a model.",
                                    ["model"], registry=r)
        self.model_gpus = Gauge("moestack_model_gpus", "GPUs a model's replicas hold.",
                                ["model"], registry=r)
        # -- cost ----------------------------------------------------------------------------
        self.cluster_gpus = Gauge("moestack_cluster_gpus", "GPUs provisioned in the cluster, by "
                                  "accelerator kind.", ["accelerator"], registry=r)
        self.cluster_cpus = Gauge("moestack_cluster_cpus", "CPUs of the cluster's CPU-only "
                                  "nodes.", registry=r)
        self.cluster_rate = Gauge("moestack_cluster_cost_usd_per_hour", "What the provisioned "
                                  "cluster costs per hour (this gateway's share).", registry=r)
        self.cluster_cost = Counter("moestack_cluster_cost_usd", "Cost of the provisioned "
                                    "cluster, idle or busy (this gateway's share).", registry=r)
        self.tenant_cost = Counter("moestack_tenant_cost_usd", "Cluster cost attributed to a "
                                   "tenant by the engine work of its requests.",
                                   ["tenant", "model"], registry=r)
        self.migrated = Counter("moestack_migrated_requests", "Streams resumed on another "
                                "replica after theirs failed or was draining mid-answer (each "
                                "resumption).", ["model", "reason"], registry=r)
        self.reprefill_tokens = Counter("moestack_migration_reprefill_tokens", "Prompt tokens "
                                        "prefilled again to resume migrated streams (operator "
                                        "overhead, billed to no tenant).", ["model"], registry=r)
        self.overhead_cost = Counter("moestack_overhead_cost_usd", "Cluster cost of the "
                                     "operator's own overhead (re-prefill of migrated "
                                     "requests), billed to no tenant.", ["model"], registry=r)
        self.idle_cost = Counter("moestack_idle_cost_usd", "Cluster cost no request used.",
                                 registry=r)
        self.baseline_cost = Counter("moestack_baseline_cost_usd", "What the same tokens would "
                                     "have cost at a baseline API.", ["baseline", "tenant"],
                                     registry=r)
        self.tenant_charged = Counter("moestack_tenant_charged_usd", "What tenants were charged "
                                      "against their budgets (tenancy token prices).",
                                      ["tenant", "model"], registry=r)
        self.budget_remaining = Gauge("moestack_tenant_budget_remaining_usd", "Budget a tenant "
                                      "has left in its current period.", ["tenant"], registry=r)

    # -- finished requests ---------------------------------------------------------------------

    def record(self, rec: RequestRecord, cost: RequestCost | None = None) -> None:
        """Count one finished request; ``cost``: its price (:meth:`CostModel.price`), counted
        when given."""
        tenant = rec.tenant or NO_TENANT
        status = str(rec.status_code)
        s = self._series(rec.model, rec.endpoint, status, tenant, rec.backend)
        s.requests.inc()
        s.tenant_requests.inc()
        s.backend_requests.inc()
        for n, series in zip((rec.prompt_tokens, rec.cached_prompt_tokens,
                              rec.completion_tokens), s.tokens):
            for child in series:  # model's, tenant's, backend's
                child.inc(n)
        if rec.adapter is not None:
            self._record_adapter(rec, tenant, status, cost)
        if rec.ttft_s is not None:
            s.child("ttft", self.ttft, rec.model).observe(rec.ttft_s)
            if rec.completion_tokens > 1:
                gap = (rec.e2e_s - rec.ttft_s) / (rec.completion_tokens - 1)
                s.child("itl", self.itl, rec.model).observe(max(0.0, gap))
        if rec.status_code == 200:
            s.child("e2e", self.e2e, rec.model).observe(rec.e2e_s)
        if cost is None:
            return
        if self.cost_model is not None:
            s.child("backend_cost", self.backend_cost, rec.backend, rec.model).inc(cost.cost_usd)
            rule = self.cost_model.config.overflow.rule(rec.model)
            if rule is not None and (price := self.cost_model.providers.get(rule.provider)):
                self.overflow_alternative.labels(rec.model, rule.provider).inc(price.usd(
                    rec.prompt_tokens, rec.cached_prompt_tokens, rec.completion_tokens))
        with self._lock:
            self.accountant.add_work(tenant, rec.model, cost.self_hosted_usd)
        for name, usd in cost.baseline_usd.items():
            s.child(("baseline", name), self.baseline_cost, name, tenant).inc(usd)
        s.child("tenant_charged", self.tenant_charged, tenant, rec.model).inc(cost.charged_usd)

    def _series(self, model: str, endpoint: str, status: str, tenant: str,
                backend: str) -> _RequestSeries:
        """The series one finished request counts in, looked up once per label combination
        (a ``labels()`` call per series and request costs more than the counting)."""
        key = (model, endpoint, status, tenant, backend)
        found = self._request_series.get(key)
        if found is None:
            if len(self._request_series) >= SERIES_CACHE_SIZE:
                self._request_series.clear()  # a bound on memory only: entries are rebuilt
            found = self._request_series[key] = _RequestSeries(self, *key)
        return found

    def _record_adapter(self, rec: RequestRecord, tenant: str, status: str,
                        cost: RequestCost | None) -> None:
        labels = (tenant, rec.model, rec.adapter)
        self.adapter_requests.labels(*labels, status).inc()
        for kind, n in (("prompt", rec.prompt_tokens), ("cached_prompt", rec.cached_prompt_tokens),
                        ("completion", rec.completion_tokens)):
            self.adapter_tokens.labels(*labels, kind).inc(n)
        if cost is not None:
            self.adapter_cost.labels(*labels).inc(cost.self_hosted_usd)
            self.adapter_charged.labels(*labels).inc(cost.charged_usd)

    # -- hooks for other gateway components ----------------------------------------------------

    def track_queue_depth(self, model: str, waiting: Callable[[], int],
                          slots: Callable[[], int]) -> None:
        """Report ``waiting()`` (requests queued for ``model``) and ``slots()`` (its dispatch
        slots) at every scrape."""
        self.queue_depth.labels(model).set_function(waiting)
        self.queue_slots.labels(model).set_function(slots)

    def track_fairness(self, model: str, view: Callable[[], FairnessSource]) -> None:
        """Report ``view()`` (the scheduler's ``fairness(model)``: virtual token counters,
        token and weight shares per tenant, whether counters are shared) at every scrape."""
        self._fairness[model] = view

    def track_routing(self, model: str, counts: Callable[[], RoutingCounts | None],
                      failovers: Callable[[], int]) -> None:
        """Report the routing of ``model`` at every scrape: ``counts()`` of the router (None
        until it routed or saw replicas) and ``failovers()``. Once the router knows the live
        replicas they replace the configured ones in ``moestack_model_replicas``."""
        self._routing[model] = (counts, failovers)
        m = self.config.model(model) if self.config is not None else None
        if m is None:
            return

        def replicas() -> int:
            c = counts()
            return c.live_replicas if c is not None and c.live_replicas is not None \
                else m.initial_replicas
        self._track_replicas(m, replicas)

    def _track_replicas(self, m: ModelConfig, replicas: Callable[[], int]) -> None:
        """``moestack_model_replicas`` and ``_gpus`` of ``m``, read from ``replicas()``."""
        gpus_per_replica = m.parallelism.world_size if m.accelerator == "gpu" else 0
        self.model_replicas.labels(m.name).set_function(replicas)
        self.model_gpus.labels(m.name).set_function(lambda: replicas() * gpus_per_replica)

    def record_migration(self, model: str, reprefilled_tokens: int,
                         reason: str = "failure") -> None:
        """Count one resumed stream and its re-prefill, valued as operator overhead; ``reason``:
        ``failure`` (its replica failed) or ``drain`` (its replica was draining)."""
        self.migrated.labels(model, reason).inc()
        self.reprefill_tokens.labels(model).inc(reprefilled_tokens)
        if self.cost_model is not None:
            with self._lock:
                self.accountant.add_overhead(
                    model, self.cost_model.reprefill_usd(model, reprefilled_tokens))

    def record_rejection(self, tenant: str, status: int) -> None:
        self.rejections.labels(tenant, str(status)).inc()

    def set_budget_remaining(self, tenant: str, usd: float) -> None:
        self.budget_remaining.labels(tenant).set(usd)

    # -- cost accrual --------------------------------------------------------------------------

    def accrue(self) -> CostSplit | None:
        """Accrue the cluster's cost since the last call and split it into tenant and idle."""
        if self.cost_model is None or self._resources is None:
            return None
        res = self._resources()
        usd_per_hour = res.usd_per_hour(self.cost_model.catalog) / self._gateway_replicas()
        with self._lock:
            now = self._clock()
            elapsed_s, self._last_accrual = max(0.0, now - self._last_accrual), now
            done = self.accountant.split(usd_per_hour * elapsed_s / 3600)
        self.cluster_rate.set(usd_per_hour)
        self.cluster_cpus.set(res.cpus)
        for kind, n in res.gpus.items():
            self.cluster_gpus.labels(kind).set(n)
        self.cluster_cost.inc(done.cluster_usd)
        self.idle_cost.inc(done.idle_usd)
        for model, usd in done.overhead_usd.items():
            self.overhead_cost.labels(model).inc(usd)
        for (tenant, model), usd in done.tenant_usd.items():
            self.tenant_cost.labels(tenant, model).inc(usd)
        return done

    def _gateway_replicas(self) -> int:
        return self.config.gateway.num_replicas if self.config is not None else 1

    def exposition(self) -> bytes:
        self.accrue()
        return generate_latest(self.registry)


class _RequestSeries:
    """The children of :class:`GatewayMetrics`' per-request series for one combination of
    model, endpoint, status, tenant and backend: those every request counts in, and the others
    (latencies, cost) once a request first counted in them (a series appears when first used,
    as with ``labels()``)."""

    __slots__ = ("requests", "tenant_requests", "backend_requests", "tokens", "_others")

    def __init__(self, m: GatewayMetrics, model: str, endpoint: str, status: str, tenant: str,
                 backend: str):
        self.requests = m.requests.labels(model, endpoint, status)
        self.tenant_requests = m.tenant_requests.labels(tenant, model, status)
        self.backend_requests = m.backend_requests.labels(backend, model, status)
        self.tokens = tuple((m.tokens.labels(model, kind),
                             m.tenant_tokens.labels(tenant, model, kind),
                             m.backend_tokens.labels(backend, model, kind))
                            for kind in TOKEN_KINDS)
        self._others: dict[Hashable, Any] = {}

    def child(self, name: Hashable, metric: MetricWrapperBase, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept under ``name``."""
        found = self._others.get(name)
        if found is None:
            found = self._others[name] = metric.labels(*labels)
        return found


class _RoutingCollector(Collector):
    """Routing counts read from each model's router at scrape time."""

    def __init__(self, sources: dict[str, tuple[Callable[[], RoutingCounts | None],
                                                Callable[[], int]]]):
        self.sources = sources

    def describe(self):
        return []  # names are declared in collect(); nothing to check at registration

    def collect(self):
        routed = CounterMetricFamily("moestack_routed_requests", "Requests routed to a replica, "
                                     "by whether the router expected a prefix-cache hit there.",
                                     labels=["model", "prefix"])
        blocks = CounterMetricFamily("moestack_routed_prefix_blocks", "Prompt prefix blocks of "
                                     "routed requests, and those the chosen replica held.",
                                     labels=["model", "kind"])
        failovers = CounterMetricFamily("moestack_failover_retries", "Requests retried on "
                                        "another replica after one failed before the first "
                                        "token.", labels=["model"])
        for model, (counts, failed) in self.sources.items():
            failovers.add_metric([model], failed())
            c = counts()
            if c is None:
                continue
            routed.add_metric([model, "hit"], c.prefix_hits)
            routed.add_metric([model, "miss"], c.requests - c.prefix_hits)
            blocks.add_metric([model, "prompt"], c.prompt_blocks)
            blocks.add_metric([model, "matched"], c.matched_blocks)
        yield from (routed, blocks, failovers)


class FairnessSource(Protocol):
    """What the fairness gauges read (``moestack.scheduling.FairnessView``)."""

    counters: dict[str, float]
    token_shares: dict[str, float]
    weight_shares: dict[str, float]
    shared: bool | None


class _FairnessCollector(Collector):
    """Fair-queue counters and shares read from the scheduler at scrape time."""

    def __init__(self, sources: dict[str, Callable[[], FairnessSource]]):
        self.sources = sources

    def describe(self):
        return []  # names are declared in collect(); nothing to check at registration

    def collect(self):
        counters = GaugeMetricFamily("moestack_fair_virtual_tokens", "Virtual token counter of "
                                     "a tenant in a model's fair queue: prompt plus completion "
                                     "tokens served, divided by its weight, lifted when idle.",
                                     labels=["model", "tenant"])
        shares = GaugeMetricFamily("moestack_fair_token_share_ratio", "A tenant's share of the "
                                   "prompt plus completion tokens served by a model over the "
                                   "last minute (all gateways when shared).",
                                   labels=["model", "tenant"])
        entitled = GaugeMetricFamily("moestack_fair_weight_share_ratio", "A tenant's share of "
                                     "the weight among a model's active tenants: the token "
                                     "share it is entitled to.", labels=["model", "tenant"])
        shared = GaugeMetricFamily("moestack_fair_shared_counters_up", "1 while the gateway "
                                   "merges its counters with the other gateways' (shared "
                                   "counters reachable), 0 while it runs on local counters.",
                                   labels=["model"])
        for model, source in self.sources.items():
            view = source()
            for tenant, value in view.counters.items():
                counters.add_metric([model, tenant], value)
            for tenant, value in view.token_shares.items():
                shares.add_metric([model, tenant], value)
            for tenant, value in view.weight_shares.items():
                entitled.add_metric([model, tenant], value)
            if view.shared is not None:
                shared.add_metric([model], 1.0 if view.shared else 0.0)
        yield from (counters, shares, entitled, shared)


def _default_resources(config: MoestackConfig) -> ResourceSource:
    """Ray's node table when this process is connected to Ray (read at most once per
    ``cost.accrual_interval_s``), else what the configured replicas reserve."""
    from moestack.metering.cost import ray_resources

    configured = ProvisionedResources.from_config(config)
    cache: dict[str, tuple[float, ProvisionedResources]] = {}

    def read() -> ProvisionedResources:
        ray = sys.modules.get("ray")  # never imported: not connected to a Ray cluster
        if ray is None or not ray.is_initialized():
            return configured
        now = time.monotonic()
        if "ray" not in cache or now - cache["ray"][0] >= config.cost.accrual_interval_s:
            cache["ray"] = (now, ray_resources())
        return cache["ray"][1]

    return read
