"""Ray resources of one ModelServer replica, derived from the model's parallelism config."""

from __future__ import annotations

from typing import Any

from moestack.config.schema import ModelConfig


def worker_bundle(config: ModelConfig) -> dict[str, float]:
    """Resources of one parallel worker (one GPU, or a CPU slot on the CPU backend)."""
    bundle: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.accelerator == "gpu":
        bundle["GPU"] = 1
    return bundle


def placement_bundles(config: ModelConfig) -> list[dict[str, float]]:
    """One bundle per worker; the replica actor itself runs in the first bundle."""
    return [worker_bundle(config) for _ in range(config.parallelism.world_size)]


def model_server_options(config: ModelConfig) -> dict[str, Any]:
    """``Deployment.options`` for the model's ModelServer."""
    bundles = placement_bundles(config)
    return {
        "name": f"ModelServer:{config.name}",
        "num_replicas": config.num_replicas,
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {
            # The actor takes the first bundle whole: its CPU slot and (on GPU) its device.
            "num_cpus": bundles[0]["CPU"],
            "num_gpus": bundles[0].get("GPU", 0),
            "runtime_env": {"env_vars": dict(config.env)},
        },
        "placement_group_bundles": bundles,
        # Workers of one replica share memory and a fast interconnect: keep them on one node
        # when they fit; multi-node layouts come from the parallel planner.
        "placement_group_strategy": "STRICT_PACK" if len(bundles) > 1 else "PACK",
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }
