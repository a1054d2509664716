"""Build the Ray Serve application of a config: one ModelServer per model behind a Gateway."""

from __future__ import annotations

from ray import serve
from ray.serve.deployment import Application

from moestack.config.schema import ModelConfig, MoestackConfig
from moestack.serve.autoscaling import scaling_options
from moestack.serve.gateway import Gateway
from moestack.serve.model_server import ModelServer
from moestack.serve.placement import model_server_options

APP_NAME = "moestack"


def model_server_app(model: ModelConfig, cache_dir: str | None) -> Application:
    """The ModelServer deployment of one model: placement, then routing, autoscaling, drain."""
    return serve.deployment(ModelServer).options(
        **{**model_server_options(model), **scaling_options(model)}
    ).bind(model.model_dump(mode="json"), cache_dir)


def build_app(config: MoestackConfig) -> Application:
    cache_dir = str(config.cache_dir) if config.cache_dir else None
    servers = {m.name: model_server_app(m, cache_dir) for m in config.models}
    gateway = serve.deployment(serve.ingress()(Gateway)).options(
        name="Gateway", num_replicas=config.gateway.num_replicas, max_ongoing_requests=2048,
        ray_actor_options={"num_cpus": 0})
    return gateway.bind(config.model_dump(mode="json"), servers)


def app_builder(args: dict) -> Application:
    """Application builder for ``serve run`` / RayService ``serveConfigV2`` import paths.

    ``import_path: moestack.serve.app:app_builder`` with ``args: {config: /path/to.yaml}`` (or
    ``args: {config_yaml: "<the YAML text>"}``); no args means the embedded default.
    """
    import yaml

    from moestack.config import load_config, parse_config

    if "config_yaml" in args:
        return build_app(parse_config(yaml.safe_load(args["config_yaml"]), source="config_yaml"))
    return build_app(load_config(args.get("config")))
