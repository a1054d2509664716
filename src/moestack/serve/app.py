"""Build the Ray Serve application of a config: one ModelServer per model behind a Gateway."""

from __future__ import annotations

from ray import serve
from ray.serve.deployment import Application

from moestack.config.schema import MoestackConfig
from moestack.serve.gateway import Gateway
from moestack.serve.model_server import ModelServer
from moestack.serve.placement import model_server_options

APP_NAME = "moestack"


def build_app(config: MoestackConfig) -> Application:
    cache_dir = str(config.cache_dir) if config.cache_dir else None
    servers = {
        m.name: serve.deployment(ModelServer).options(**model_server_options(m))
        .bind(m.model_dump(mode="json"), cache_dir)
        for m in config.models
    }
    gateway = serve.deployment(serve.ingress()(Gateway)).options(
        name="Gateway", num_replicas=config.gateway.num_replicas, max_ongoing_requests=2048,
        ray_actor_options={"num_cpus": 0})
    return gateway.bind(config.model_dump(mode="json"), servers)
