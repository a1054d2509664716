"""Ray placement of the ModelServer replicas: Serve deployment options from the bundles
:mod:`moestack.parallel.placement` derives, and the placement groups on the live cluster.

:func:`check_app_fits_cluster` compares every model's bundles against the connected cluster's
nodes before the app is deployed, and :func:`reserve` waits for a placement group with a timeout,
so an impossible layout fails at start with a reason instead of hanging (Ray Serve would wait
for the group forever). Inside a replica, :func:`verify_replica_placement` checks that its
tensor-parallel groups stay within nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.parallel.placement import (
    PlacementError,
    check_bundle_nodes,
    check_config_fits_cluster,
    check_feasible,
    replica_placement,
)

RESERVE_TIMEOUT_S = 60.0


def model_server_options(config: ModelConfig) -> dict[str, Any]:
    """``Deployment.options`` for the model's ModelServer."""
    bundles, strategy = replica_placement(config)
    # A single-GPU replica owns its GPU; with several, vLLM's Ray workers take the GPUs of the
    # bundles and the replica actor only a CPU slot.
    actor_gpus = bundles[0].get("GPU", 0) if config.parallelism.world_size == 1 else 0
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
        "placement_group_strategy": strategy,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }


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
