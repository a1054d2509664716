"""Routing policies on in-process fake-engine replicas: load spreading, prefix affinity, tenants."""

import asyncio
import random
from collections import Counter

import pytest

from moestack.config.schema import ModelConfig, RoutingConfig
from moestack.engine import build_engine
from moestack.routing import POLICIES, ReplicaState, Router, RoutingRequest
from moestack.routing.replica_set import ReplicaSet
from moestack.routing.prefix import PrefixIndex, block_hashes
from moestack.testing import fake_model
from moestack.testing.requests import answer_text, completion


async def replica_set(policy: str, n: int = 4, seed: int = 0, **fake) -> ReplicaSet:
    config = ModelConfig.model_validate(fake_model(max_model_len=4096, fake=fake,
                                                   routing={"policy": policy}))
    engines = {f"r{i}": build_engine(config) for i in range(n)}
    for e in engines.values():
        await e.start()
    return ReplicaSet(engines, Router(config.routing, seed=seed))


async def run(replicas: ReplicaSet, rid: str, prompt: str, max_tokens: int = 4,
              tenant: str | None = None):
    request = completion(prompt, max_tokens, request_id=rid, max_model_len=4096)
    return [c async for c in replicas.serve(request, tenant)][-1]


def family_prompts(families: int, per_family: int, seed: int = 1) -> list[str]:
    """Prompts sharing a long system prefix per family, each with its own question."""
    rng = random.Random(seed)
    prefixes = [" ".join(f"sys{f}w{i}" for i in range(120)) for f in range(families)]
    prompts = [f"{prefixes[f]} question {f}-{k} " + " ".join(f"q{rng.random():.6f}"
                                                             for _ in range(8))
               for f in range(families) for k in range(per_family)]
    rng.shuffle(prompts)
    return prompts


async def test_least_outstanding_tokens_spreads_concurrent_load_evenly():
    replicas = await replica_set("least_outstanding_tokens", n=4, token_interval_s=0.01)
    await asyncio.gather(*(run(replicas, f"r{i}", "hello world", max_tokens=10)
                           for i in range(40)))
    per_replica = Counter(replicas.routed_to.values())
    assert sorted(per_replica) == ["r0", "r1", "r2", "r3"]
    assert max(per_replica.values()) - min(per_replica.values()) <= 3, per_replica
    assert all(replicas.router.outstanding_tokens(r) == 0 for r in replicas.engines)


async def test_random_policy_spreads_worse_than_least_outstanding_tokens():
    spreads = {}
    for policy in ("random", "least_outstanding_tokens"):
        worst = 0
        for seed in range(5):
            replicas = await replica_set(policy, n=4, seed=seed, token_interval_s=0.005)
            await asyncio.gather(*(run(replicas, f"r{i}", "hi", max_tokens=5) for i in range(24)))
            counts = Counter(replicas.routed_to.values())
            fewest = min(counts.get(r, 0) for r in replicas.engines)
            worst = max(worst, max(counts.values()) - fewest)
        spreads[policy] = worst
    assert spreads["least_outstanding_tokens"] < spreads["random"], spreads


async def test_prefix_affinity_raises_prefix_cache_hits():
    hit_ratio = {}
    for policy in ("least_outstanding_tokens", "prefix_affinity"):
        replicas = await replica_set(policy, n=4, prefix_cache_tokens=100_000,
                                     prefix_block_tokens=16)
        for i, prompt in enumerate(family_prompts(families=6, per_family=8)):
            await run(replicas, f"q{i}", prompt)
        caches = [e.prefix_cache for e in replicas.engines.values()]
        hit_ratio[policy] = (sum(c.hit_tokens for c in caches)
                             / sum(c.queried_tokens for c in caches))
    assert hit_ratio["prefix_affinity"] > 0.75, hit_ratio
    assert hit_ratio["prefix_affinity"] > hit_ratio["least_outstanding_tokens"] + 0.2, hit_ratio


async def test_chunks_report_cached_prompt_tokens_of_the_replica_that_served_them():
    replicas = await replica_set("prefix_affinity", n=3, prefix_cache_tokens=10_000,
                                 prefix_block_tokens=8)
    prompt = " ".join(f"w{i}" for i in range(100))
    first = await run(replicas, "a", prompt + " one")
    second = await run(replicas, "b", prompt + " two")
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == 96
    assert replicas.routed_to["a"] == replicas.routed_to["b"]


def test_load_guard_sends_a_hot_prefix_to_a_less_loaded_replica():
    router = Router(RoutingConfig(policy="prefix_affinity", load_guard_tokens=100,
                                  prefix_block_chars=8), seed=0)
    request = RoutingRequest("x", prefix_blocks=block_hashes("a" * 64, 8), estimated_tokens=10)
    router.routed(request, "hot", key="earlier")
    within_guard = [ReplicaState("hot", 90), ReplicaState("cold", 0)]
    assert router.rank(request, within_guard)[0] == "hot"
    over_guard = [ReplicaState("hot", 500), ReplicaState("cold", 0)]
    assert router.rank(request, over_guard)[0] == "cold"


def test_full_replicas_are_skipped_while_another_has_room():
    router = Router(RoutingConfig(policy="least_outstanding_tokens"), seed=0)
    states = [ReplicaState("full", 0, ongoing_requests=4, max_ongoing_requests=4),
              ReplicaState("busy", 10_000, ongoing_requests=1, max_ongoing_requests=4)]
    for _ in range(10):
        assert router.rank(RoutingRequest("x", estimated_tokens=5), states)[0] == "busy"


@pytest.mark.parametrize("policy", ["tenant_least_outstanding_tokens", "tenant_prefix_affinity"])
async def test_tenant_aware_policies_keep_each_tenant_on_its_own_replicas(policy):
    replicas = await replica_set(policy, n=6)
    tenants = [f"tenant{t}" for t in range(5)]
    seen: dict[str, set[str]] = {t: set() for t in tenants}
    for i in range(60):
        tenant = tenants[i % len(tenants)]
        await run(replicas, f"r{i}", f"prompt {i}", tenant=tenant)
        seen[tenant].add(replicas.routed_to[f"r{i}"])
    assert all(1 <= len(s) <= 2 for s in seen.values()), seen
    assert len(set().union(*seen.values())) >= 4, seen


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_registered_policy_ranks_only_given_replicas_with_scores_in_unit_interval(policy):
    router = Router(RoutingConfig(policy=policy), seed=3)
    states = [ReplicaState(f"r{i}", outstanding_tokens=100 * i) for i in range(5)]
    request = RoutingRequest("x", prefix_blocks=block_hashes("p" * 300, 64), estimated_tokens=9,
                             tenant="t")
    router.routed(request, "r2", key="before")
    order = router.rank(request, states)
    assert order and set(order) <= {s.replica_id for s in states}
    for scorer, _ in router.pipeline.scorers:
        assert all(0.0 <= v <= 1.0 for v in scorer.score(request, states).values())


def test_completed_and_forgotten_requests_release_outstanding_tokens_and_prefixes():
    router = Router(RoutingConfig(policy="prefix_affinity", prefix_block_chars=4))
    request = RoutingRequest("x", prefix_blocks=block_hashes("abcdefgh", 4), estimated_tokens=7)
    router.routed(request, "r1", key="k1")
    router.routed(request, "r1", key="k2")
    assert router.outstanding_tokens("r1") == 14
    router.completed("k1")
    assert router.outstanding_tokens("r1") == 7
    router.forget("r1")
    assert router.outstanding_tokens("r1") == 0 and len(router.index) == 0


def test_a_replica_that_leaves_marks_only_the_requests_routed_to_it_as_left():
    router = Router(RoutingConfig())
    router.routed(RoutingRequest("on-r1", estimated_tokens=5), "r1", key="k1")
    router.routed(RoutingRequest("on-r2", estimated_tokens=5), "r2", key="k2")
    router.reserve(RoutingRequest("queued", estimated_tokens=5), "r1", key="k3")
    router.routed(RoutingRequest("done", estimated_tokens=5), "r1", key="k4")
    router.completed("k4")
    router.forget("r1")  # draining (or dead): its routed requests may move elsewhere
    assert set(router.left) == {"on-r1"}  # not the one only reserved there, nor a finished one
    router.forget("r2")
    assert list(router.left) == ["on-r1", "on-r2"]  # oldest first


def test_prefix_hashes_are_chained_so_only_a_shared_prefix_matches():
    a = block_hashes("AAAA" "BBBB" "CCCC", 4)
    b = block_hashes("AAAA" "BBBB" "DDDD", 4)
    c = block_hashes("ZZZZ" "BBBB" "CCCC", 4)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert not set(a) & set(c)
    index = PrefixIndex(capacity_blocks=100)
    assert index.insert(a, "r1") == 0
    assert index.match(b, ["r1", "r2"]) == {"r1": 2, "r2": 0}
    # insert() reports what match() would have for that replica, before recording the blocks.
    assert index.insert(b, "r2") == 0 and index.insert(b, "r1") == 2
    assert index.insert(a, "r1") == 3


def test_prefix_index_evicts_least_recently_used_blocks():
    index = PrefixIndex(capacity_blocks=2)
    index.insert([1, 2], "r1")
    index.insert([3], "r2")
    assert index.match([1, 2], ["r1"]) == {"r1": 0}
    assert index.match([3], ["r2"]) == {"r2": 1}


def test_reservation_counts_at_once_moves_when_routed_elsewhere_and_expires(monkeypatch):
    from moestack.routing import router as router_module

    router = Router(RoutingConfig())
    request = RoutingRequest("x", estimated_tokens=10)
    router.reserve(request, "r1", key="k")
    assert router.outstanding_tokens("r1") == 10 and router.reserved("k") is request
    router.routed(request, "r2", key="k")
    assert (router.outstanding_tokens("r1"), router.outstanding_tokens("r2")) == (0, 10)
    assert router.reserved("k") is None  # routed: no longer only reserved
    router.reserve(request, "r3", key="never-routed")
    now = router_module.time.monotonic()
    monkeypatch.setattr(router_module.time, "monotonic",
                        lambda: now + router_module.RESERVATION_TTL_S + 1)
    router.reserve(request, "r1", key="fresh")  # reserved after the clock moved: kept
    router.rank(request, [ReplicaState("r3")])
    assert router.outstanding_tokens("r3") == 0 and router.outstanding_tokens("r2") == 10
    assert router.reserved("never-routed") is None and router.outstanding_tokens("r1") == 10


async def test_replica_set_backend_serves_the_gateway_path_and_reports_health():
    from moestack.routing.replica_set import ReplicaSetBackend

    replicas = await replica_set("least_outstanding_tokens", n=2)
    backend = ReplicaSetBackend({"fake-moe": replicas})
    chunks = [c async for c in backend.serve("fake-moe", completion("a b", 3))]
    assert answer_text(chunks) == "tok1 tok2 tok3 " and chunks[-1].usage.completion_tokens == 3
    assert (await backend.info("fake-moe")).model == "fake-moe"
    assert await backend.check_health() == {"fake-moe": None}
    replicas.engines["r1"].healthy = False
    assert "replica r1" in (await backend.check_health())["fake-moe"]


def test_routing_package_exports_are_pinned():
    import moestack.routing

    assert sorted(moestack.routing.__all__) == [
        "POLICIES", "Pipeline", "ReplicaState", "Router", "RoutingRequest", "register_policy"]
