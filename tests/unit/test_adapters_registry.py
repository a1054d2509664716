"""The LoRA adapter registry: checks at registration, the admin API and CLI, and use through the
gateway on the fake engine (tenant isolation, /v1/models, ledger, metrics, price)."""

import re

import openai
import pytest

from moestack.adapters import AdapterSpec, build_adapter
from moestack.api.adapter_checks import check_and_register
from moestack.cli import main
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from moestack.errors import ConflictError, InvalidAdapterError, InvalidRequestError, NotFoundError
from moestack.metering.splits import by_adapter, format_adapter_table
from moestack.tenancy import adapters as registry
from moestack.tenancy import query_usage
from moestack.tenancy.store import TenancyStore
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

BASE, PLAIN = "tiny-llama", "plain"
LORA = {"enabled": True, "max_lora_rank": 8, "max_loras": 2}
ADMIN_KEY = "admin-secret-of-the-adapter-tests-0123456789"


@pytest.fixture(scope="module")
def checkpoint():
    return ensure_tiny_model(TinySpec("llama"))


@pytest.fixture(scope="module")
def adapter_dirs(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": build_adapter(checkpoint, root / "a1", AdapterSpec(seed=1)),
        "a2": build_adapter(checkpoint, root / "a2", AdapterSpec(seed=2)),
        "rank16": build_adapter(checkpoint, root / "rank16", AdapterSpec(rank=16, seed=3)),
        "other": build_adapter(checkpoint, root / "other", AdapterSpec(
            seed=4, base_model_name="mistralai/Mistral-7B-v0.1")),
    }


def config(tmp_path, **price):
    return fake_config(fake_model(BASE, tiny={"arch": "llama"}, lora=LORA),
                       fake_model(PLAIN, tiny={"arch": "llama"}),
                       storage={"url": f"sqlite:///{tmp_path}/t.db"},
                       tenancy={"enabled": True, "auth_cache_ttl_s": 0, "prices": price})


@pytest.fixture
def store(tmp_path):
    store = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    for name in ("team-a", "team-b"):
        store.create_tenant(name)
    yield store
    store.close()


def add(store, cfg, name, path, **kw):
    return check_and_register(store, cfg, name=name, base_model=kw.pop("base", BASE),
                                     path=path, owner=kw.pop("owner", "team-a"), **kw)


def test_registers_adapter_with_hash_rank_and_private_to_its_owner(tmp_path, store,
                                                                   adapter_dirs):
    a = add(store, config(tmp_path), "support-bot", adapter_dirs["a1"])
    assert (a.rank, a.owner, a.shared_with, a.base_model) == (8, "team-a", (), BASE)
    assert re.fullmatch(r"[0-9a-f]{64}", a.sha256)
    assert a.usable_by("team-a") and not a.usable_by("team-b")
    shared = add(store, config(tmp_path), "shared-bot", adapter_dirs["a2"],
                 shared_with=["team-b"])
    assert shared.usable_by("team-b") and shared.sha256 != a.sha256
    assert [x.name for x in registry.list_adapters(store, "team-b")] == ["shared-bot"]
    assert [x.name for x in registry.list_adapters(store)] == ["shared-bot", "support-bot"]


@pytest.mark.parametrize("case, error, code", [
    ("missing", InvalidAdapterError, "invalid_adapter"),
    ("malformed", InvalidAdapterError, "invalid_adapter"),
    ("rank16", InvalidAdapterError, "invalid_adapter"),
    ("other", InvalidAdapterError, "base_model_mismatch"),
    ("unknown_model", InvalidRequestError, "unknown_model"),
    ("lora_off", InvalidRequestError, "lora_disabled"),
    ("unknown_tenant", NotFoundError, "tenant_not_found"),
    ("model_name", ConflictError, "name_taken_by_model"),
    ("duplicate", ConflictError, "adapter_exists"),
])
def test_bad_registration_is_a_clear_4xx_and_registers_nothing(tmp_path, store, adapter_dirs,
                                                               case, error, code):
    cfg = config(tmp_path)
    add(store, cfg, "taken", adapter_dirs["a1"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    kw = {"missing": dict(path=tmp_path / "nope"), "malformed": dict(path=bad),
          "rank16": dict(path=adapter_dirs["rank16"]), "other": dict(path=adapter_dirs["other"]),
          "unknown_model": dict(base="nope"), "lora_off": dict(base=PLAIN),
          "unknown_tenant": dict(owner="nobody"), "model_name": dict(name=PLAIN),
          "duplicate": dict(name="taken")}[case]
    with pytest.raises(error) as info:
        add(store, cfg, kw.pop("name", "new"), kw.pop("path", adapter_dirs["a2"]), **kw)
    assert info.value.code == code and 400 <= info.value.status_code < 500
    if case == "rank16":
        assert "rank 16 is over the model's max_lora_rank 8" in info.value.message
    assert [a.name for a in registry.list_adapters(store)] == ["taken"]


async def chat(client, model, **kw):
    return await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, **kw)


async def test_tenant_uses_its_adapter_and_another_tenant_gets_the_same_404(tmp_path,
                                                                            adapter_dirs):
    cfg = config(tmp_path, **{BASE: {"usd_per_1m_prompt_tokens": 1.0,
                                     "usd_per_1m_completion_tokens": 1.0}})
    async with local_stack(cfg) as stack:
        store = stack.tenancy.store
        _, key_a = store.create_tenant("team-a")
        _, key_b = store.create_tenant("team-b")
        add(store, cfg, "a-bot", adapter_dirs["a1"], usd_per_1m_tokens=1_000_000.0)
        a, b = stack.openai(key_a.plaintext), stack.openai(key_b.plaintext)
        answer = await chat(a, "a-bot")
        assert answer.model == "a-bot" and "a-bot.tok" in answer.choices[0].message.content
        done = await a.completions.create(model="a-bot", prompt="x y", max_tokens=2)
        assert done.choices[0].text.startswith("a-bot.tok")
        base = await chat(a, BASE)
        assert "a-bot" not in base.choices[0].message.content

        errors = []
        for model in ("a-bot", "no-such-model"):
            with pytest.raises(openai.NotFoundError) as info:
                await chat(b, model)
            errors.append(info.value.body)
        assert errors[0] == {**errors[1], "message": errors[1]["message"].replace(
            "no-such-model", "a-bot")}
        assert errors[0]["code"] == "model_not_found"

        ids_a = {m.id: getattr(m, "parent", None) for m in (await a.models.list()).data}
        ids_b = {m.id for m in (await b.models.list()).data}
        assert ids_a == {BASE: None, PLAIN: None, "a-bot": BASE}
        assert ids_b == {BASE, PLAIN}
        assert (await a.models.retrieve("a-bot")).parent == BASE
        with pytest.raises(openai.NotFoundError):
            await b.models.retrieve("a-bot")

        stack.tenancy.writer.flush()
        rows = {(r.model, r.adapter, r.endpoint): r
                for r in query_usage(store, tenant="team-a")}
        assert set(rows) == {(BASE, "a-bot", "chat.completions"), (BASE, "a-bot", "completions"),
                             (BASE, None, "chat.completions")}
        adapter_row = rows[(BASE, "a-bot", "chat.completions")]
        # The adapter's own price (1 USD per token) replaced the base's (1 USD per 1M tokens).
        tokens = adapter_row.prompt_tokens + adapter_row.completion_tokens
        assert adapter_row.charged_usd == pytest.approx(tokens)
        assert rows[(BASE, None, "chat.completions")].charged_usd < 0.001
        split = by_adapter(query_usage(store))
        assert split[("team-a", BASE, "a-bot")].requests == 2
        assert "a-bot" in format_adapter_table(split)
        metrics = stack.app.state.metrics.exposition().decode()
        assert ('moestack_adapter_requests_total{adapter="a-bot",model="tiny-llama",'
                'status="200",tenant="team-a"} 2.0') in metrics
        assert 'moestack_adapter_tokens_total{adapter="a-bot"' in metrics


async def test_admin_api_registers_refuses_and_removes_adapters(tmp_path, adapter_dirs,
                                                                monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cfg = config(tmp_path)
    async with local_stack(cfg) as stack:
        _, key = stack.tenancy.store.create_tenant("team-a")
        body = {"name": "a-bot", "base_model": BASE, "path": str(adapter_dirs["a1"]),
                "owner": "team-a"}
        assert (await stack.operator.post("/admin/v1/adapters", json=body)).status_code == 401
        r = await stack.operator.post("/admin/v1/adapters", json=body, headers=admin)
        assert r.status_code == 201 and r.json()["rank"] == 8
        r = await stack.operator.post("/admin/v1/adapters", json=body, headers=admin)
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
        r = await stack.operator.post("/admin/v1/adapters", headers=admin, json={
            **body, "name": "big", "path": str(adapter_dirs["rank16"])})
        assert r.status_code == 400 and "max_lora_rank 8" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await stack.operator.post("/admin/v1/adapters", headers=admin,
                                      json={**body, "name": "x", "owner": "nobody"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "tenant_not_found"
        r = await stack.operator.get("/admin/v1/adapters?tenant=team-a", headers=admin)
        assert [a["name"] for a in r.json()["data"]] == ["a-bot"]

        client = stack.openai(key.plaintext)
        await chat(client, "a-bot")
        engine = stack.engines[BASE]
        assert "a-bot" in engine.stats().adapters
        r = await stack.operator.delete("/admin/v1/adapters/a-bot", headers=admin)
        assert r.status_code == 200 and r.json()["unloaded"] is True
        assert "a-bot" not in engine.stats().adapters
        with pytest.raises(openai.NotFoundError):
            await chat(client, "a-bot")
        r = await stack.operator.delete("/admin/v1/adapters/a-bot", headers=admin)
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_adapters_from_the_command_line(tmp_path, capsys, adapter_dirs, store):
    cfg_file = tmp_path / "moestack.yaml"
    cfg_file.write_text(
        f"models:\n- name: {BASE}\n  engine: fake\n  tiny: {{arch: llama}}\n"
        f"  lora: {{enabled: true, max_lora_rank: 8}}\n"
        f"storage: {{url: 'sqlite:///{tmp_path}/t.db'}}\n")
    common = ("--config", str(cfg_file))
    rc, out, _ = run(capsys, "adapters", "add", "a-bot", "-m", BASE, "--path",
                     str(adapter_dirs["a1"]), "--owner", "team-a", "--share-with", "team-b",
                     "--usd-per-1m-tokens", "2.5", *common)
    assert rc == 0 and "owner=team-a shared=team-b rank=8 price=2.5 USD/1M" in out
    rc, _, err = run(capsys, "adapters", "add", "big", "-m", BASE, "--path",
                     str(adapter_dirs["rank16"]), "--owner", "team-a", *common)
    assert rc == 1 and "max_lora_rank 8" in err
    rc, out, _ = run(capsys, "adapters", "list", "--tenant", "team-b", *common)
    assert rc == 0 and out.startswith("a-bot: base=tiny-llama")
    rc, out, _ = run(capsys, "adapters", "remove", "a-bot", *common)
    assert rc == 0 and "removed a-bot" in out
    rc, out, _ = run(capsys, "adapters", "list", *common)
    assert out == ""
    rc, _, err = run(capsys, "adapters", "remove", "a-bot", *common)
    assert rc == 1 and "no adapter named" in err


async def test_limits_budget_and_fair_queue_count_adapter_requests_as_the_tenants(
        tmp_path, adapter_dirs):
    cfg = config(tmp_path, **{BASE: {"usd_per_1m_prompt_tokens": 1.0,
                                     "usd_per_1m_completion_tokens": 1.0}})
    async with local_stack(cfg) as stack:
        store = stack.tenancy.store
        _, key = store.create_tenant("team-a", requests_per_min=3, budget_usd=50.0)
        add(store, cfg, "cheap-bot", adapter_dirs["a1"])
        add(store, cfg, "dear-bot", adapter_dirs["a2"], usd_per_1m_tokens=1_000_000.0)
        client = stack.openai(key.plaintext)
        # The adapter's own price (1 USD per token) is reserved: 100 tokens are over budget,
        # while the same request on the base model (1 USD per 1M tokens) is not.
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model="dear-bot", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
        assert info.value.body["code"] == "insufficient_quota"
        await chat(client, BASE)
        await chat(client, "cheap-bot")
        await chat(client, "dear-bot")
        with pytest.raises(openai.RateLimitError) as info:  # RPM 3: adapters count too
            await chat(client, "cheap-bot")
        assert info.value.body["code"] == "rate_limit_exceeded"
        # One fair queue per base model: the adapters' tokens are the tenant's there.
        assert set(stack.scheduler.fairness(BASE).counters) == {"team-a"}
        assert set(stack.scheduler.fairness(PLAIN).counters) == set()
