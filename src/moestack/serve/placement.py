"""Ray resources of one ModelServer replica, derived from its parallel layout.

One bundle per parallel worker (a GPU, or a CPU slot on the CPU backend); the replica actor runs
in the first bundle. A replica that fits one node is STRICT_PACKed onto it. A multi-node replica
is PACKed (whole nodes first) and vLLM runs its workers as Ray actors in the bundles (the ``ray``
distributed executor backend); vLLM groups ranks by node, so tensor-parallel groups stay inside a
node as long as every node holds a multiple of TP bundles, which :func:`check_bundle_nodes`
verifies. :func:`check_feasible` compares the bundles against the cluster's nodes before a
placement group is created, and :func:`reserve` waits for one with a timeout, so an impossible
layout fails at start with a reason instead of hanging.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.errors import MoestackError

Bundle = dict[str, float]
DEFAULT_GPUS_PER_NODE = 8
RESERVE_TIMEOUT_S = 60.0


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
    from moestack.parallel.gpus import get_gpu

    return get_gpu(config.gpu).gpus_per_node


def worker_bundles(world_size: int, cpus_per_worker: float = 1.0, gpu: bool = True
                   ) -> list[Bundle]:
    """One bundle per parallel worker (one GPU, or a CPU slot on the CPU backend); the replica
    actor itself runs in the first bundle."""
    bundle: Bundle = {"CPU": cpus_per_worker, **({"GPU": 1.0} if gpu else {})}
    return [dict(bundle) for _ in range(world_size)]


def placement_bundles(config: ModelConfig) -> list[Bundle]:
    return worker_bundles(config.parallelism.world_size, config.cpus_per_worker,
                          config.accelerator == "gpu")


def model_server_options(config: ModelConfig) -> dict[str, Any]:
    """``Deployment.options`` for the model's ModelServer."""
    bundles = placement_bundles(config)
    world = config.parallelism.world_size
    # A single-GPU replica owns its GPU; with several, vLLM's Ray workers take the GPUs of the
    # bundles and the replica actor only a CPU slot.
    actor_gpus = bundles[0].get("GPU", 0) if world == 1 else 0
    return {
        "name": f"ModelServer:{config.name}",
        "num_replicas": config.num_replicas,
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": bundles[0]["CPU"],
            "num_gpus": actor_gpus,
            "runtime_env": {"env_vars": dict(config.env)},
        },
        "placement_group_bundles": bundles,
        "placement_group_strategy": placement_strategy(
            world, gpus_per_node(config) if config.accelerator == "gpu" else world),
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }


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


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def reserve(bundles: Sequence[Mapping[str, float]], strategy: str, *,
            timeout_s: float = RESERVE_TIMEOUT_S, what: str = "replica"):
    """Create a placement group after checking the cluster can host it; wait ``timeout_s``.

    Returns the ready placement group; raises :class:`PlacementError` (and removes the group)
    when the cluster cannot host it or it is not ready in time (resources held by others).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_feasible(bundles, strategy, cluster_nodes(), what)
    pg = placement_group([dict(b) for b in bundles], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(f"{what}: placement group of {len(bundles)} bundles ({strategy}) "
                             f"was not ready after {timeout_s:g} s; the resources are held "
                             "by other work")
    return pg


def bundle_nodes(pg) -> list[str]:
    """Node id of each bundle of a ready placement group, in bundle order."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in range(len(table))]


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
    opts = model_server_options(config)
    replicas = max(1, config.initial_replicas)
    bundles, strategy = opts["placement_group_bundles"], opts["placement_group_strategy"]
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


def check_app_fits_cluster(models: Sequence[ModelConfig],
                           nodes: Sequence[Mapping[str, float]] | None = None) -> None:
    """Preflight before deploying: raise :class:`PlacementError` naming the first model whose
    replicas the cluster (default: the connected Ray cluster) can never host. Ray Serve would
    otherwise wait for the placement group forever."""
    nodes = cluster_nodes() if nodes is None else nodes
    for model in models:
        check_config_fits_cluster(model, nodes)


def verify_replica_placement(config: ModelConfig) -> None:
    """Inside a replica: check its placement group keeps TP groups within nodes."""
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None or config.parallelism.world_size <= 1:
        return
    check_bundle_nodes(bundle_nodes(pg), config.parallelism.tensor_parallel_size,
                       f"model {config.name}")
