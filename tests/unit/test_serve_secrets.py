"""No secret in any Ray Serve deployment's arguments: Serve pickles them into its checkpoint in
the GCS, which every Ray node reads. The Gateway reads the store URL from its own environment.

The app is built with Ray Serve's own builder (what ``serve.run`` deploys), without a cluster.
"""

import cloudpickle
import pytest
import yaml
from ray.serve._private.build_app import build_app as serve_build

from moestack.errors import ConfigError
from moestack.serve.app import (
    STORAGE_URL_ENV,
    app_builder,
    build_app,
    gateway_config,
    store_url_env,
    url_has_secret,
)
from moestack.serve.gateway import replica_config
from moestack.testing import fake_config, fake_model

PASSWORD = "pg-Pa55-w0rd-of-the-test"
URL = f"postgresql+psycopg2://moestack:{PASSWORD}@db.internal:5432/moestack"
ADMIN_KEY = "admin-key-that-must-stay-in-the-env-0123456789"


def config_with_password(url: str = URL):
    return fake_config(fake_model("fake-moe", env={"VLLM_CPU_KVCACHE_SPACE": "1"}),
                       fake_model("fake-other"), storage={"url": url},
                       tenancy={"enabled": True})


def deployment_blobs(app) -> dict[str, bytes]:
    """Per deployment: everything Serve stores of it (init args and kwargs, actor options with
    the runtime environment, deployment config), pickled as Serve pickles it."""
    built = serve_build(app, name="moestack")
    return {d.name: cloudpickle.dumps((d.init_args, d.init_kwargs, d.ray_actor_options,
                                       d._deployment_config))
            for d in built.deployments}


def test_no_deployment_argument_holds_the_store_password_or_the_admin_key(monkeypatch):
    monkeypatch.setenv(STORAGE_URL_ENV, URL)
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    blobs = deployment_blobs(build_app(config_with_password()))
    assert set(blobs) == {"Gateway", "ModelServer:fake-moe", "ModelServer:fake-other"}
    for name, blob in blobs.items():
        assert PASSWORD.encode() not in blob, name
        assert ADMIN_KEY.encode() not in blob, name
    # The check sees what it should: the Gateway's config, the engines' environment.
    assert b"db.internal" in blobs["Gateway"]
    assert b"VLLM_CPU_KVCACHE_SPACE" in blobs["ModelServer:fake-moe"]


def test_the_gateway_gets_the_url_by_variable_name_and_reads_it_in_its_process(monkeypatch):
    monkeypatch.setenv(STORAGE_URL_ENV, URL)
    arg = gateway_config(config_with_password())
    assert arg["storage"] == {**arg["storage"], "url_env": STORAGE_URL_ENV,
                              "url": "postgresql+psycopg2://moestack@db.internal:5432/moestack"}
    assert replica_config(arg).storage.url == URL
    monkeypatch.delenv(STORAGE_URL_ENV)
    with pytest.raises(ConfigError, match=f"{STORAGE_URL_ENV}, which is not set") as err:
        replica_config(arg)
    assert PASSWORD not in str(err.value)


def test_building_refuses_a_password_the_gateways_environment_does_not_carry(monkeypatch):
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    with pytest.raises(ConfigError, match="storage.url holds a password") as err:
        build_app(config_with_password())
    assert PASSWORD not in str(err.value)


def test_a_url_without_password_still_travels_in_the_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    sqlite = f"sqlite:///{tmp_path}/t.db"
    arg = gateway_config(config_with_password(sqlite))
    assert arg["storage"]["url"] == sqlite and arg["storage"]["url_env"] is None
    assert store_url_env(config_with_password(sqlite)) == {}
    assert store_url_env(config_with_password()) == {STORAGE_URL_ENV: URL}


def test_a_password_in_the_query_counts_as_a_secret_too(monkeypatch):
    query_url = "postgresql+psycopg2://u@db/moestack?sslmode=require&password=" + PASSWORD
    assert url_has_secret(query_url) and url_has_secret(URL)
    assert not url_has_secret("postgresql+psycopg2://u@db/moestack?sslmode=require")
    monkeypatch.setenv(STORAGE_URL_ENV, query_url)
    arg = gateway_config(config_with_password(query_url))
    assert PASSWORD not in yaml.safe_dump(arg) and "sslmode=require" in arg["storage"]["url"]


def test_a_rayservice_config_naming_its_own_variable_passes_that_name_on(monkeypatch):
    """The RayService path (Helm): ``storage.url_env`` in the config names the variable."""
    monkeypatch.setenv("CUSTOM_DB_URL", URL)
    raw = {"models": [fake_model("fake-moe")], "storage": {"url_env": "CUSTOM_DB_URL"},
           "tenancy": {"enabled": True}}
    app = app_builder({"config_yaml": yaml.safe_dump(raw)})
    blobs = deployment_blobs(app)
    assert all(PASSWORD.encode() not in blob for blob in blobs.values())
    assert b"CUSTOM_DB_URL" in blobs["Gateway"]


def test_moestack_up_exports_the_url_to_the_ray_it_starts(monkeypatch):
    """``start_ray`` puts the URL (and the header-limit callback) into the environment every
    process of a local Ray inherits, before ``ray.init``."""
    import os

    import ray

    from moestack.serve import runner as local

    started = {}
    monkeypatch.setattr(ray, "init", lambda **kw: started.update(kw))
    env = {k: v for k, v in os.environ.items()
           if k not in (STORAGE_URL_ENV, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")}
    monkeypatch.setattr(os, "environ", env)  # what start_ray sets stays in this test
    local.start_ray(config_with_password(), verbose=False)
    assert started and os.environ[STORAGE_URL_ENV] == URL
    assert os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == \
        "moestack.serve.http_limits:serve_http_middlewares"
