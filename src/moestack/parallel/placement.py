"""Ray placement bundles of one replica, derived from its parallel layout, and the checks that a
cluster's nodes can host them (pure functions: :mod:`moestack.serve.placement` creates the
placement groups with them).

One bundle per parallel worker (a GPU, or a CPU slot on the CPU backend); the replica actor runs
in the first bundle. A replica that fits one node is STRICT_PACKed onto it. A multi-node replica
is PACKed (whole nodes first) and vLLM runs its workers as Ray actors in the bundles (the ``ray``
distributed executor backend); vLLM groups ranks by node, so tensor-parallel groups stay inside a
node as long as every node holds a multiple of TP bundles, which :func:`check_bundle_nodes`
verifies. :func:`check_feasible` compares the bundles against the cluster's nodes before a
placement group is created, so an impossible layout fails at start with a reason instead of
hanging.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from moestack.config.schema import ModelConfig
from moestack.errors import MoestackError
from moestack.parallel.gpus import get_gpu

Bundle = dict[str, float]
DEFAULT_GPUS_PER_NODE = 8


class PlacementError(MoestackError):
    """The cluster cannot host a replica's placement group; the message says why."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "placement_infeasible"


def placement_strategy(world_size: int, gpus_per_node: int) -> str:
    """STRICT_PACK when the replica fits one node; PACK (node by node) when it spans several."""
    if world_size <= 1:
        return "PACK"
    return "STRICT_PACK" if world_size <= gpus_per_node else "PACK"


def gpus_per_node(config: ModelConfig) -> int:
    """``gpus_per_node`` if set, else the `gpu` catalog entry's, else 8."""
    if config.gpus_per_node is not None:
        return config.gpus_per_node
    if config.gpu is None:
        return DEFAULT_GPUS_PER_NODE
    return get_gpu(config.gpu).gpus_per_node


def worker_bundles(world_size: int, cpus_per_worker: float = 1.0, gpu: bool = True
                   ) -> list[Bundle]:
    """One bundle per parallel worker (one GPU, or a CPU slot on the CPU backend); the replica
    actor itself runs in the first bundle."""
    bundle: Bundle = {"CPU": cpus_per_worker, **({"GPU": 1.0} if gpu else {})}
    return [dict(bundle) for _ in range(world_size)]


def replica_placement(config: ModelConfig) -> tuple[list[Bundle], str]:
    """The bundles and strategy of one replica of the configured model."""
    world = config.parallelism.world_size
    gpu = config.accelerator == "gpu"
    return (worker_bundles(world, config.cpus_per_worker, gpu),
            placement_strategy(world, gpus_per_node(config) if gpu else world))


def _total(bundles: Sequence[Mapping[str, float]]) -> Counter:
    need = Counter()
    for b in bundles:
        need.update(b)
    return need


def check_feasible(bundles: Sequence[Mapping[str, float]], strategy: str,
                   nodes: Sequence[Mapping[str, float]], what: str = "replica"
                   ) -> Mapping[str, float] | None:
    """Raise :class:`PlacementError` when no assignment of ``bundles`` to ``nodes`` (each a
    mapping of total resources) can exist under ``strategy``. Greedy first-fit, largest first:
    exact for the uniform per-worker bundles moestack builds. Under STRICT_PACK, returns the
    first node that holds them all."""
    need = _total(bundles)
    cluster = Counter()
    for n in nodes:
        cluster.update({k: v for k, v in n.items() if k in need})
    short = [f"{k}: needs {need[k]:g}, the cluster has {cluster[k]:g}" for k in sorted(need)
             if need[k] > cluster[k] + 1e-9]
    if short:
        raise PlacementError(f"{what} cannot be placed: {'; '.join(short)}")
    if strategy == "STRICT_PACK":
        host = next((n for n in nodes if all(n.get(k, 0) + 1e-9 >= v for k, v in need.items())),
                    None)
        if host is None:
            best = max((n.get("GPU", 0) for n in nodes), default=0)
            raise PlacementError(
                f"{what} needs {dict(need)} on one node (STRICT_PACK) but no node has that "
                f"much (largest GPU count on a node: {best:g}); give it fewer GPUs or span "
                "nodes with a multi-node layout")
        return host
    free = [dict(n) for n in nodes]
    for i, b in enumerate(sorted(bundles, key=lambda b: -sum(b.values()))):
        spot = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in b.items())),
                    None)
        if spot is None:
            raise PlacementError(f"{what}: bundle {dict(b)} (#{i}) fits on no node once the "
                                 f"others are placed; nodes: {[dict(n) for n in nodes]}")
        for k, v in b.items():
            spot[k] -= v
        if strategy == "STRICT_SPREAD":
            free.remove(spot)
    return None


def check_bundle_nodes(nodes_of_bundles: Sequence[str], tensor_parallel_size: int,
                       what: str = "replica") -> None:
    """Raise when a node holds a number of bundles that is not a multiple of TP: vLLM would
    then have to build a tensor-parallel group across two nodes."""
    counts = Counter(nodes_of_bundles)
    bad = {n[:8]: c for n, c in counts.items() if c % tensor_parallel_size}
    if bad:
        raise PlacementError(f"{what}: nodes hold {dict(counts)} workers; {bad} is not a "
                             f"multiple of TP={tensor_parallel_size}, so a tensor-parallel "
                             "group would straddle nodes")


def check_config_fits_cluster(config: ModelConfig, nodes: Sequence[Mapping[str, float]]) -> None:
    """Preflight for ``moestack up``: the replicas ``config`` starts with can be placed on
    ``nodes`` (with autoscaling: the initial replicas, at least one)."""
    bundles, strategy = replica_placement(config)
    replicas = max(1, config.initial_replicas)
    if strategy == "STRICT_PACK" and replicas > 1:
        # Each replica packs on its own node: place them one after another.
        free, need = [dict(n) for n in nodes], _total(bundles)
        for r in range(replicas):
            host = check_feasible(bundles, strategy, free, f"model {config.name} replica {r + 1}")
            for k, v in need.items():
                host[k] -= v
        return
    check_feasible(bundles * replicas, strategy, nodes,
                   f"model {config.name} ({replicas} replica(s))")
