"""The cost model: what a request costs self-hosted and at each baseline API, and how the cost
of the provisioned cluster is split between tenants and idle time.

* :class:`CostModel` prices one :class:`RequestRecord`, once, when it ends: the replica-seconds
  its tokens took (uncached prompt tokens x measured prefill cost + completion tokens x measured
  decode cost) at the replica's USD per second, the same tokens at every baseline of the pricing
  catalog, and what the tenant is charged (``tenancy.prices``); the ledger and the metrics both
  take that one :class:`~moestack.usage.RequestCost`.
* :class:`ProvisionedResources` is what the cluster holds (GPUs by kind, CPUs of CPU-only nodes),
  read from Ray's node table or, without Ray, from the configured replicas.
* :class:`CostAccountant` accrues the cluster's cost per second and, at the end of each period,
  splits it (:class:`CostSplit`) between the tenants whose requests did work in that period and
  idle cost. Conservation: sum of tenant costs + idle cost = cluster cost, in every period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from moestack.config.schema import ModelConfig, MoestackConfig
from moestack.errors import ConfigError
from moestack.metering.pricing import CPU, PricingCatalog, load_pricing
from moestack.metering.provider_prices import PROVIDER_PREFIX, provider_prices
from moestack.usage import RequestCost, RequestRecord

NO_TENANT = "none"
"""Tenant label of requests served while tenancy is off."""


class CostModel:
    """Prices requests of the models of one config against one pricing catalog."""

    def __init__(self, config: MoestackConfig, catalog: PricingCatalog):
        self.config = config
        self.catalog = catalog
        self._usd_per_s = {m.name: replica_usd_per_hour(m, catalog) / 3600 for m in config.models}
        self.providers = provider_prices(config.overflow.providers, catalog)

    @classmethod
    def from_config(cls, config: MoestackConfig) -> CostModel:
        """The config's pricing catalog (embedded default if unset) with its price overrides."""
        return cls(config, load_pricing(config.pricing_file, config.cost.usd_per_gpu_hour))

    def replica_usd_per_s(self, model: str) -> float:
        return self._usd_per_s.get(model, 0.0)

    def engine_seconds(self, record: RequestRecord) -> float:
        unit = self.config.cost.token_cost(record.model)
        uncached = max(0, record.prompt_tokens - record.cached_prompt_tokens)
        return (uncached * unit.prefill_s_per_token
                + record.completion_tokens * unit.decode_s_per_token)

    def reprefill_usd(self, model: str, tokens: int) -> float:
        """What prefilling ``tokens`` again costs (a migrated request's resumed prompt)."""
        return (tokens * self.config.cost.token_cost(model).prefill_s_per_token
                * self.replica_usd_per_s(model))

    def price(self, record: RequestRecord) -> RequestCost:
        """Self-hosted, baseline and charged USD of one finished request; one answered by an
        overflow provider (``backend`` ``provider:<name>``) took no engine work and costs its
        tokens at the provider's prices (``provider_usd``)."""
        provider = (self.providers.get(record.backend.removeprefix(PROVIDER_PREFIX))
                    if record.backend.startswith(PROVIDER_PREFIX) else None)
        engine_s = self.engine_seconds(record) if provider is None else 0.0
        baselines = {name: b.usd(record.prompt_tokens, record.cached_prompt_tokens,
                                 record.completion_tokens)
                     for name, b in self.catalog.baselines.items()}
        charged = self.config.tenancy.price(record.model).usd(record.prompt_tokens,
                                                              record.completion_tokens)
        provider_usd = provider.usd(record.prompt_tokens, record.cached_prompt_tokens,
                                    record.completion_tokens) if provider is not None else 0.0
        return RequestCost(engine_s, engine_s * self.replica_usd_per_s(record.model), baselines,
                           charged, provider_usd=provider_usd)


def replica_usd_per_hour(model: ModelConfig, catalog: PricingCatalog) -> float:
    """USD per hour of one replica of ``model``: its workers' GPUs, or its CPUs on CPU."""
    workers = model.parallelism.world_size
    if model.accelerator == "gpu":
        if not model.gpu:
            raise ConfigError(f"models[{model.name}].gpu: needed to price a GPU model "
                              "(h100, h200, a100, l40s, b200, ...)")
        return workers * catalog.usd_per_gpu_hour(model.gpu)
    return workers * model.cpus_per_worker * catalog.usd_per_gpu_hour(CPU)


@dataclass(frozen=True)
class ProvisionedResources:
    """What the cluster holds, idle or busy: GPUs by kind, and CPUs of nodes without GPUs.

    A GPU node is priced by its GPUs only (GPU-hour prices include the host); a CPU-only node by
    its CPUs.
    """

    gpus: Mapping[str, float] = field(default_factory=dict)
    cpus: float = 0.0

    @classmethod
    def from_ray_nodes(cls, nodes: Iterable[Mapping]) -> ProvisionedResources:
        """From ``ray.nodes()``: alive nodes only; the GPU kind is the node's
        ``accelerator_type:<kind>`` resource (``GPU`` when Ray does not know it)."""
        gpus: dict[str, float] = defaultdict(float)
        cpus = 0.0
        for node in nodes:
            if not node.get("Alive", False):
                continue
            res = node.get("Resources", {})
            if res.get("GPU", 0) > 0:
                kinds = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
                gpus[kinds[0] if kinds else "GPU"] += res["GPU"]
            else:
                cpus += res.get("CPU", 0.0)
        return cls(dict(gpus), cpus)

    @classmethod
    def from_config(cls, config: MoestackConfig) -> ProvisionedResources:
        """What the configured replicas reserve (a stack running without Ray)."""
        gpus: dict[str, float] = defaultdict(float)
        cpus = 0.0
        for m in config.models:
            workers = m.parallelism.world_size * m.num_replicas
            if m.accelerator == "gpu":
                gpus[(m.gpu or "GPU").upper()] += workers
            else:
                cpus += workers * m.cpus_per_worker
        return cls(dict(gpus), cpus)

    def usd_per_hour(self, catalog: PricingCatalog) -> float:
        return (sum(n * catalog.usd_per_gpu_hour(kind) for kind, n in self.gpus.items())
                + self.cpus * catalog.usd_per_gpu_hour(CPU))


def ray_resources() -> ProvisionedResources:
    """What the Ray cluster this process is connected to reports as provisioned."""
    import ray

    return ProvisionedResources.from_ray_nodes(ray.nodes())


@dataclass(frozen=True)
class CostSplit:
    """One accrual period: the cluster's cost and where it went."""

    cluster_usd: float
    tenant_usd: Mapping[tuple[str, str], float]
    """(tenant, model) -> USD attributed in this period."""
    idle_usd: float
    overhead_usd: Mapping[str, float] = field(default_factory=dict)
    """model -> USD of the operator's own overhead in this period (the re-prefill of migrated
    requests), billed to no tenant."""


class CostAccountant:
    """Accrues cluster cost and splits it into tenant and idle cost, period by period.

    Work is valued at the cost model's price (:meth:`add_work`). At :meth:`split` the period's
    cluster cost is known; if the valued work fits in it, each tenant pays its work and the rest is
    idle; if the work exceeds it (the engine was faster than the measured cost per token says),
    the cluster cost is split in proportion to the work and idle is zero. Either way the period's
    tenant costs plus idle cost equal its cluster cost. Operator overhead
    (:meth:`add_overhead`) is work too, split the same way and reported apart:
    tenants + overhead + idle = cluster.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], float] = defaultdict(float)
        self._overhead: dict[str, float] = defaultdict(float)

    def add_overhead(self, model: str, usd: float) -> None:
        """Work no tenant pays for (a migrated request's re-prefill), valued in USD."""
        self._overhead[model] += usd

    def add_work(self, tenant: str, model: str, usd: float) -> None:
        self._pending[(tenant, model)] += usd

    def split(self, cluster_usd: float) -> CostSplit:
        """Close the period whose provisioned cost was ``cluster_usd``."""
        work = sum(self._pending.values()) + sum(self._overhead.values())
        if work <= cluster_usd:
            shares, overhead = dict(self._pending), dict(self._overhead)
            idle = cluster_usd - work
        else:
            shares = {k: cluster_usd * v / work for k, v in self._pending.items()}
            overhead = {k: cluster_usd * v / work for k, v in self._overhead.items()}
            idle = 0.0
        self._pending.clear()
        self._overhead.clear()
        return CostSplit(cluster_usd, shares, idle, overhead)
