"""Build the Ray Serve application of a config: one ModelServer per model behind a Gateway.

No secret goes into a deployment's arguments: Ray Serve pickles every deployment's init
arguments, options and runtime environment into its checkpoint in the GCS key-value store, which
every Ray node can read, GPU workers included. The admin key and provider keys are only ever
named by environment variable (``*_env`` fields). A store URL that holds a password
(:func:`url_has_secret`) is given to the Gateway as the name of an environment variable instead
(``storage.url_env``, :data:`STORAGE_URL_ENV` unless the config names another), which the
Gateway replica reads from its own process environment: the Helm chart puts it on the head pod,
where the gateways run, from its Secret; ``moestack up`` exports it before it starts a local Ray,
whose processes inherit it (:func:`store_url_env`).
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from moestack.config.schema import ModelConfig, MoestackConfig
from moestack.errors import ConfigError
from moestack.serve.autoscaling import scaling_options
from moestack.serve.gateway import HEALTH_CHECK_PERIOD_S, Gateway
from moestack.serve.model_server import ModelServer
from moestack.serve.placement import model_server_options

APP_NAME = "moestack"

STORAGE_URL_ENV = "MOESTACK_DATABASE_URL"
"""Environment variable holding a store URL with a password, in the Gateway's processes (the
Helm chart's name for it)."""


def url_has_secret(url: str) -> bool:
    """Whether a SQLAlchemy URL carries a password (in its user info or its query)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.password is not None or any("password" in k.lower() for k in parsed.query)


def without_secret(url: str) -> str:
    """``url`` less its password (user info and query), for a config that must hold none."""
    from sqlalchemy.engine import URL, make_url

    u = make_url(url)
    query = {k: v for k, v in u.query.items() if "password" not in k.lower()}
    return URL.create(u.drivername, u.username, None, u.host, u.port, u.database,
                      query).render_as_string(hide_password=False)


def store_url_env(config: MoestackConfig, url_env: str = STORAGE_URL_ENV) -> dict[str, str]:
    """The environment a Gateway process needs for ``config``'s store URL: the URL under
    ``url_env`` if it holds a password, else nothing (it travels in the arguments)."""
    return {url_env: config.storage.url} if url_has_secret(config.storage.url) else {}


def gateway_config(config: MoestackConfig, url_env: str = STORAGE_URL_ENV) -> dict[str, Any]:
    """The Gateway's config argument: ``config`` less its secrets (see the module docstring).
    Raises ConfigError if the store URL holds a password that ``url_env`` does not carry here,
    where the app is built (the Gateway's node: the Helm chart builds it on the head pod)."""
    dump = config.model_dump(mode="json")
    if url_has_secret(config.storage.url):
        if os.environ.get(url_env) != config.storage.url:
            raise ConfigError(
                "storage.url holds a password, and deployment arguments are stored where every "
                "Ray node can read them: put the URL in the environment variable "
                f"{url_env} of the nodes running the Gateway and set storage.url_env: {url_env} "
                "(`moestack up` does this itself for a Ray cluster it starts)")
        dump["storage"] |= {"url": without_secret(config.storage.url), "url_env": url_env}
    return dump


SERVE_LOGGING = {"enable_access_log": False}
"""Ray Serve's per-call access log line is off on both deployments: every request is already in
moestack's metrics (and, with tenancy, its usage ledger), and the line cost each replica a log
write per handle call."""


def model_server_app(model: ModelConfig, cache_dir: str | None,
                     num_replicas: int | None = None) -> Application:
    """The ModelServer deployment of one model: placement, then routing, autoscaling, drain.
    ``num_replicas`` overrides the model's replica count alone. Serve scales a running
    deployment without a rollout only if the version is unchanged: Python's ``serve.run``
    gives an unversioned deployment a new random version each time, so a caller that wants a
    scale-down sets one (see :func:`moestack.testing.migration_probe.model_server`)."""
    options = {**model_server_options(model), **scaling_options(model)}
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    return serve.deployment(ModelServer).options(
        **options, logging_config=SERVE_LOGGING,
    ).bind(model.model_dump(mode="json"), cache_dir)


def build_app(config: MoestackConfig, storage_url_env: str = STORAGE_URL_ENV) -> Application:
    """The app of ``config``; a store URL with a password reaches the Gateway through the
    environment variable ``storage_url_env`` (see :func:`gateway_config`)."""
    cache_dir = str(config.cache_dir) if config.cache_dir else None
    servers = {m.name: model_server_app(m, cache_dir) for m in config.models}
    gateway = serve.deployment(serve.ingress()(Gateway)).options(
        name="Gateway", num_replicas=config.gateway.num_replicas, max_ongoing_requests=2048,
        health_check_period_s=HEALTH_CHECK_PERIOD_S, ray_actor_options={"num_cpus": 0},
        logging_config=SERVE_LOGGING)
    return gateway.bind(gateway_config(config, storage_url_env), servers)


def app_builder(args: dict) -> Application:
    """Application builder for ``serve run`` / RayService ``serveConfigV2`` import paths.

    ``import_path: moestack.serve.app:app_builder`` with ``args: {config: /path/to.yaml}`` (or
    ``args: {config_yaml: "<the YAML text>"}``); no args means the embedded default. A
    ``storage.url_env`` in the config names the variable the Gateway reads the URL from too.
    """
    import yaml

    from moestack.config import embedded_default_path, load_config, parse_config
    from moestack.config.loader import read_yaml

    if "config_yaml" in args:
        raw = yaml.safe_load(args["config_yaml"])
        config = parse_config(raw, source="config_yaml")
    else:
        path = args.get("config") or embedded_default_path()
        raw, config = read_yaml(path, "config"), load_config(path)
    url_env = ((raw or {}).get("storage") or {}).get("url_env") or STORAGE_URL_ENV
    return build_app(config, url_env)
