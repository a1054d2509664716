"""Tenants share no prefix cache and no prefix affinity: the gateway's per-tenant ``cache_salt``.

Fake engine with its simulated prefix cache (which keys blocks by ``cache_salt`` as vLLM does),
SQLite store; the same checks on the tiny vLLM model are in
``tests/integration/test_tenant_isolation_stack.py``.
"""

import json

import pytest

from moestack.api.backend import LocalBackend
from moestack.config.schema import RoutingConfig
from moestack.routing import Router
from moestack.routing.prefix import block_hashes, salted
from moestack.tenancy.keys import CACHE_SALT_CHARS, cache_salt, parse_key
from moestack.testing import fake_config, fake_model
from moestack.testing.fake_engine import FakePrefixCache
from moestack.testing.local_api import local_stack

MODEL = "fake-moe"
ADMIN_KEY = "cache-salt-test-admin-key-0123456789abcdef"
PROMPT = " ".join(f"the victim's secret figure is 900 w{i}" for i in range(12))


def config(tmp_path):
    return fake_config(fake_model(MODEL, max_model_len=4096,
                                  fake={"prefix_cache_tokens": 100_000,
                                        "prefix_block_tokens": 4}),
                       storage={"url": f"sqlite:///{tmp_path}/t.db"},
                       tenancy={"enabled": True, "auth_cache_ttl_s": 0})


@pytest.fixture
async def stack(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTACK_ADMIN_KEY", ADMIN_KEY)
    async with local_stack(config(tmp_path)) as s:
        s.keys = {name: s.tenancy.store.create_tenant(name)[1].plaintext
                  for name in ("victim", "prober")}
        yield s


async def cached_tokens(stack, tenant: str, prompt: str = PROMPT, **extra) -> int:
    r = await stack.http.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 2, **extra},
        headers={"Authorization": f"Bearer {stack.keys[tenant]}"})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_a_tenant_repeating_its_prompt_hits_the_cache_and_another_tenant_does_not(stack):
    assert await cached_tokens(stack, "victim") == 0
    assert await cached_tokens(stack, "victim") > 0  # its own prefix is cached
    assert await cached_tokens(stack, "prober") == 0  # the same prompt, another tenant
    assert await cached_tokens(stack, "prober") > 0  # the prober's own copy now


async def test_a_client_sent_cache_salt_is_overridden_by_the_tenants_own(stack):
    await cached_tokens(stack, "victim")
    [seen] = stack.engines[MODEL].requests_seen
    victim_salt = seen.body["cache_salt"]
    # Even knowing the victim's salt, the prober's request runs under the prober's salt,
    # plain or with a \u-escaped key.
    assert await cached_tokens(stack, "prober", cache_salt=victim_salt) == 0
    raw = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2})[:-1]
    r = await stack.http.post("/v1/completions",
                              content=raw + ', "cache\\u005fsalt": "%s"}' % victim_salt,
                              headers={"Authorization": f"Bearer {stack.keys['prober']}",
                                       "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"][
        "cached_tokens"] > 0  # its own cached copy from the call before, not the victim's
    salts = [s.body["cache_salt"] for s in stack.engines[MODEL].requests_seen]
    assert salts[0] == victim_salt and salts[1] == salts[2] != victim_salt


async def test_the_engine_gets_a_salt_derived_from_the_tenant_id_and_a_server_secret(stack):
    await cached_tokens(stack, "victim")
    await cached_tokens(stack, "victim")
    first, second = (s.body["cache_salt"] for s in stack.engines[MODEL].requests_seen)
    _, tenant = stack.tenancy.store.key_record(parse_key(stack.keys["victim"])[0])
    tenant_id = tenant.id
    assert first == second == cache_salt(ADMIN_KEY.encode(), tenant_id)
    assert len(first) == CACHE_SALT_CHARS and first != str(tenant_id)
    assert "victim" not in first


def test_cache_salts_differ_per_tenant_and_per_secret_and_fit_vllms_rules():
    salts = {cache_salt(b"secret-a", t) for t in range(1000)}
    assert len(salts) == 1000
    assert cache_salt(b"secret-a", 1) != cache_salt(b"secret-b", 1)
    assert all(len(s) <= 128 and not set(s) & set("@/\\\x00") for s in salts)


async def test_without_tenancy_the_body_keeps_the_clients_salt(tmp_path):
    cfg = fake_config(fake_model(MODEL))
    async with local_stack(cfg) as s:
        r = await s.http.post("/v1/completions", json={
            "model": MODEL, "prompt": "a b", "max_tokens": 1, "cache_salt": "mine"})
        assert r.status_code == 200
        assert s.engines[MODEL].requests_seen[0].body["cache_salt"] == "mine"


class RecordingBackend(LocalBackend):
    def __init__(self, engines):
        super().__init__(engines)
        self.requests = []

    def serve(self, model, request):
        self.requests.append(request)
        return super().serve(model, request)


async def test_equal_prompts_of_two_tenants_get_different_prefix_routing_keys(stack):
    backend = RecordingBackend(stack.engines)
    stack.app.state.relay.backend = backend
    for tenant in ("victim", "victim", "prober"):
        await cached_tokens(stack, tenant)
    victim, again, prober = (block_hashes(r.prompt_text, 64) for r in backend.requests)
    assert victim == again and len(victim) > 2
    assert not set(victim) & set(prober)


def test_a_replica_holding_one_tenants_prefix_matches_nothing_of_anothers():
    router = Router(RoutingConfig(policy="prefix_affinity", prefix_block_chars=16))
    a = block_hashes(salted(PROMPT, "salt-of-a"), 16)
    b = block_hashes(salted(PROMPT, "salt-of-b"), 16)
    router.index.insert(a, "r0")
    assert router.index.match(a, ["r0", "r1"]) == {"r0": len(a), "r1": 0}
    assert router.index.match(b, ["r0", "r1"]) == {"r0": 0, "r1": 0}
    assert salted(PROMPT, None) == PROMPT


def test_fake_prefix_cache_shares_blocks_only_within_one_salt():
    cache = FakePrefixCache(capacity_tokens=1000, block_tokens=4)
    ids = list(range(21))
    cache.insert(cache.keys(ids, "a"))
    assert cache.lookup(cache.keys(ids, "a"), len(ids)) == 20
    assert cache.lookup(cache.keys(ids, "b"), len(ids)) == 0
    assert cache.lookup(cache.keys(ids), len(ids)) == 0  # no salt is a salt of its own
