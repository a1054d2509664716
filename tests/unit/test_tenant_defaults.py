"""Settings of new tenants from `tenancy.new_tenant_defaults` (CLI and admin API)."""

import pytest
import yaml

from moestack.cli import main
from moestack.config import load_config
from moestack.tenancy.store import TenancyStore
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

ADMIN_KEY = "admin-secret-of-the-tests-0123456789"


def run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def config_file(tmp_path, **defaults):
    path = tmp_path / "moestack.yaml"
    path.write_text(yaml.safe_dump({
        "models": [fake_model("fake-moe")], "storage": {"url": f"sqlite:///{tmp_path}/t.db"},
        "tenancy": {"enabled": True, "new_tenant_defaults": defaults}}))
    return str(path)


def tenant(tmp_path, name):
    store = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    try:
        return store.get_tenant(name)
    finally:
        store.close()


def test_default_defaults_bound_a_new_tenant_and_leave_its_models_to_the_operator():
    d = load_config(None).tenancy.new_tenant_defaults
    assert d.allowed_models is None
    assert (d.requests_per_min, d.max_concurrent_requests) == (600, 32)
    assert (d.tokens_per_min, d.budget_usd, d.budget_period) == (None, None, "month")


def test_cli_create_needs_models_unless_the_defaults_name_some(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/t.db"
    rc, _, err = run(capsys, "tenants", "create", "acme", "--db", db)
    assert rc == 1 and "--models" in err and "new_tenant_defaults" in err
    rc, out, _ = run(capsys, "tenants", "create", "acme", "--db", db, "--models", "fake-moe")
    assert rc == 0 and "models=fake-moe" in out and "rpm=600" in out and "concurrent=32" in out
    # Explicit values win over the defaults, `none` included.
    rc, out, _ = run(capsys, "tenants", "create", "big", "--db", db, "--models", "*",
                     "--rpm", "none", "--max-concurrent", "4")
    assert rc == 0 and "rpm=-" in out and "concurrent=4" in out


def test_cli_create_takes_the_defaults_of_the_config(tmp_path, capsys):
    config = config_file(tmp_path, allowed_models=["fake-moe"], requests_per_min=None,
                         tokens_per_min=5000, budget_usd=20.0, budget_period="day", weight=2.0)
    rc, out, _ = run(capsys, "tenants", "create", "acme", "--config", config)
    assert rc == 0
    info = tenant(tmp_path, "acme")
    assert info.allowed_models == ("fake-moe",) and info.requests_per_min is None
    assert (info.tokens_per_min, info.max_concurrent_requests) == (5000, 32)
    assert (info.budget_usd, info.budget_period, info.weight) == (20.0, "day", 2.0)


def test_invalid_defaults_are_refused_when_the_config_loads(tmp_path):
    with pytest.raises(Exception, match="allowed_models"):
        load_config(config_file(tmp_path, allowed_models=[]))
    with pytest.raises(Exception, match="max_concurrent_requests"):
        load_config(config_file(tmp_path, max_concurrent_requests=-1))


async def test_admin_api_create_fills_what_is_left_out_from_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    config = fake_config(fake_model("fake-moe"), storage={"url": f"sqlite:///{tmp_path}/t.db"},
                         tenancy={"enabled": True,
                                  "new_tenant_defaults": {"max_concurrent_requests": 2}})
    async with local_stack(config) as stack:
        r = await stack.operator.post("/admin/v1/tenants", headers=admin, json={"name": "a"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "allowed_models"
        assert r.json()["error"]["code"] == "allowed_models_required"
        r = await stack.operator.post("/admin/v1/tenants", headers=admin, json={
            "name": "a", "allowed_models": ["fake-moe"], "requests_per_min": None,
            "priority": None})
        assert r.status_code == 201, r.text
        made = r.json()["tenant"]
        assert made["allowed_models"] == ["fake-moe"] and made["requests_per_min"] is None
        assert made["max_concurrent_requests"] == 2 and made["priority"] == 0
        # The defaults are what a tenant gets: the concurrency limit holds on the API.
        key = r.json()["api_key"]
        assert (await stack.http.post("/v1/completions", headers={
            "Authorization": f"Bearer {key}"}, json={"model": "fake-moe", "prompt": "a",
                                                       "max_tokens": 1})).status_code == 200
