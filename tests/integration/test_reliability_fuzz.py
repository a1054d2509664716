"""Fuzzing every public endpoint from the gateway's own OpenAPI schema (schemathesis, valid and
invalid inputs): no input may produce a 5xx, and every error must be OpenAI-shaped.

Two apps over the fake engine, in process: tenancy off (the OpenAI routes), and tenancy on with
a SQLite ledger (the OpenAI routes behind tenant keys, the tenant usage route and the admin API).
Each generated request is sent as generated and, when it names a model, once more naming the
served model, so that fuzzed bodies also reach the engine path and not only the 404 for an
unknown model. On the tenancy app requests carry a valid key (the admin key on /admin routes)
unless the generated case sets its own ``Authorization`` header.
"""

import asyncio
import os
import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from moestack.api.app import build_api
from moestack.api.backend import LocalBackend
from moestack.api.operator import build_operator_api
from moestack.engine import build_engine
from moestack.testing import fake_config, fake_model

pytestmark = pytest.mark.integration

MODEL = "fake-moe"
ADMIN_ENV = "MOESTACK_FUZZ_ADMIN_KEY"
ADMIN_KEY = "fuzz-admin-key-of-at-least-32-characters"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _app(**sections):
    config = fake_config(fake_model(MODEL, max_model_len=512),
                         gateway={"max_body_bytes": 65536, "docs_enabled": True}, **sections)
    engines = {m.name: build_engine(m) for m in config.models}
    for engine in engines.values():
        asyncio.run(engine.start())  # the fake engine only marks itself started
    return build_api(config, LocalBackend(engines))


APP = _app()
CLIENT = TestClient(APP, raise_server_exceptions=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def _tenancy_app():
    # schemathesis reads the schema when the module is collected, so the app is built here; its
    # ledger lives in a temporary folder removed when the module's tests are done.
    os.environ[ADMIN_ENV] = ADMIN_KEY
    app = _app(tenancy={"enabled": True, "bootstrap_tenant": None, "admin_key_env": ADMIN_ENV},
               storage={"url": f"sqlite:///{DB_DIR.name}/ledger.db"})
    client = TestClient(app, raise_server_exceptions=False)
    operator = build_operator_api(app.state.config, app.state.metrics, app.state.tenancy)
    operator_client = TestClient(operator, raise_server_exceptions=False)
    resp = operator_client.post("/admin/v1/tenants", json={"name": "fuzz", "allowed_models": ["*"]},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 201, resp.text
    return app, client, operator, operator_client, resp.json()["api_key"]


DB_DIR = tempfile.TemporaryDirectory(prefix="fuzz-ledger-")
TENANCY_APP, TENANCY_CLIENT, OPERATOR_APP, OPERATOR_CLIENT, TENANT_KEY = _tenancy_app()
tenancy_schema = schemathesis.openapi.from_asgi("/openapi.json", TENANCY_APP)
operator_schema = schemathesis.openapi.from_asgi("/openapi.json", OPERATOR_APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    TENANCY_APP.state.tenancy.store.close()
    os.environ.pop(ADMIN_ENV, None)
    DB_DIR.cleanup()


def _send(client, kwargs: dict):
    kwargs = dict(kwargs)
    kwargs.pop("cookies", None)
    if isinstance(kwargs.get("data"), bytes | str):
        kwargs["content"] = kwargs.pop("data")
    return client.request(**kwargs)


def _check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]


def _fuzz(client, kwargs: dict) -> None:
    _check(_send(client, kwargs))
    body = kwargs.get("json")
    if isinstance(body, dict) and "model" in body:
        _check(_send(client, {**kwargs, "json": {**body, "model": MODEL}}))


def test_schemas_list_every_public_route():
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(
        APP.openapi()["paths"])
    assert "/v1/usage" in set(TENANCY_APP.openapi()["paths"])
    assert {"/admin/v1/tenants", "/admin/v1/keys/{key_id}", "/metrics"} <= set(
        OPERATOR_APP.openapi()["paths"])


@schema.parametrize()
@FUZZ
def test_no_input_gets_a_server_error(case):
    _fuzz(CLIENT, case.as_transport_kwargs(base_url="http://testserver"))


def _fuzz_with_keys(case, client=None) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    headers = dict(kwargs.get("headers") or {})
    if not any(h.lower() == "authorization" for h in headers):
        key = ADMIN_KEY if case.path.startswith("/admin/") else TENANT_KEY
        headers["Authorization"] = f"Bearer {key}"
    _fuzz(client or TENANCY_CLIENT, {**kwargs, "headers": headers})


@tenancy_schema.parametrize()
@FUZZ
def test_no_input_gets_a_server_error_with_tenancy(case):
    _fuzz_with_keys(case)


@operator_schema.parametrize()
@FUZZ
def test_no_input_gets_a_server_error_on_the_operator_app(case):
    _fuzz_with_keys(case, OPERATOR_CLIENT)
