"""LoRA adapters across replicas: affinity routing, load before serve, removal everywhere."""

import asyncio
import dataclasses

import pytest

from moestack.api.backend import LocalBackend
from moestack.config.schema import ModelConfig, RoutingConfig
from moestack.engine import build_engine
from moestack.engine.protocol import AdapterRef
from moestack.errors import InvalidAdapterError
from moestack.routing import ReplicaState, Router, RoutingRequest
from moestack.routing.adapters import REPORT_GRACE_S, AdapterIndex, adapter_slots
from moestack.routing.ray_router import request_router_config
from moestack.routing.replica_set import ReplicaSet, ReplicaSetBackend
from moestack.testing import fake_model
from moestack.testing.requests import engine_request

LORA = {"enable_lora": True, "max_loras": 2}
REPLICAS = ["r0", "r1", "r2", "r3"]


def router(affinity: bool = True, seed: int = 0, policy: str = "least_outstanding_tokens",
           **routing) -> Router:
    return Router(RoutingConfig(policy=policy, adapter_affinity=affinity, **routing),
                  seed=seed, adapter_slots=2)


def states(**outstanding: int) -> list[ReplicaState]:
    return [ReplicaState(rid, outstanding.get(rid, 0)) for rid in REPLICAS]


def asking(adapter: str | None, i: int = 0) -> RoutingRequest:
    return RoutingRequest(f"q{i}", estimated_tokens=100, adapter=adapter)


def adapter_request(name: str | None, request_id: str, max_tokens: int = 3):
    request = engine_request({"model": name or "fake-moe", "prompt": "a b",
                              "max_tokens": max_tokens}, request_id=request_id)
    ref = AdapterRef(name, f"/adapters/{name}", "0" * 64) if name else None
    return dataclasses.replace(request, adapter=ref)


# ---- ranking -------------------------------------------------------------------------------

def test_a_replica_holding_the_adapter_is_chosen():
    r = router()
    r.adapters.routed("r2", "sql-helper")
    firsts = {r.rank(asking("sql-helper", i), states())[0] for i in range(50)}
    assert firsts == {"r2"}


def test_a_reported_holder_is_chosen_and_load_balances_among_holders():
    r = router()
    r.adapters.report("r1", ["sql-helper"])
    r.adapters.report("r3", ["sql-helper", "legal"])
    firsts = [r.rank(asking("sql-helper", i), states(r1=300))[0] for i in range(50)]
    assert set(firsts) == {"r3"}  # both hold it; r3 is less loaded (power of two choices)


def test_an_overloaded_holder_is_passed_over_for_the_least_loaded():
    r = router(load_guard_tokens=1000)
    r.adapters.routed("r2", "sql-helper")
    order = r.rank(asking("sql-helper"), states(r0=500, r1=500, r2=1600, r3=0))
    assert order[0] != "r2"
    # Within the guard it is still preferred.
    assert r.rank(asking("sql-helper"), states(r0=500, r1=500, r2=900, r3=0))[0] == "r2"


def test_an_adapter_no_one_holds_goes_where_the_eviction_costs_least():
    r = router()
    for rid, held in (("r0", ["hot", "warm"]), ("r1", ["hot", "cold"]), ("r2", ["hot", "warm"]),
                      ("r3", ["warm", "hot"])):
        for name in held:
            r.adapters.routed(rid, name)
    for _ in range(20):
        r.adapters.asked("hot")
    for _ in range(5):
        r.adapters.asked("warm")
    r.adapters.asked("cold")
    # Least recently used: r0 hot, r1 hot, r2 hot, r3 warm: a load on r3 evicts the least asked.
    assert {r.rank(asking("new", i), states())[0] for i in range(30)} == {"r3"}
    r.adapters.forget("r2")  # a free slot costs nothing
    assert {r.rank(asking("new", i), states())[0] for i in range(30)} == {"r2"}


@pytest.mark.parametrize("policy", ["least_outstanding_tokens", "prefix_affinity", "random"])
def test_affinity_off_routes_exactly_as_the_policy_does_without_adapters(policy):
    off, plain = router(affinity=False, seed=3, policy=policy), router(seed=3, policy=policy)
    off.adapters.routed("r1", "sql-helper")
    loads = [states(r0=i * 7 % 300, r1=i * 13 % 300, r2=i * 5 % 300) for i in range(40)]
    assert ([off.rank(asking("sql-helper", i), s) for i, s in enumerate(loads)]
            == [plain.rank(asking(None, i), s) for i, s in enumerate(loads)])


def test_requests_without_an_adapter_are_routed_as_before():
    on, plain = router(seed=5), router(affinity=False, seed=5)
    on.adapters.routed("r1", "sql-helper")
    loads = [states(r0=i * 7 % 300, r1=i * 13 % 300) for i in range(40)]
    assert ([on.rank(asking(None, i), s) for i, s in enumerate(loads)]
            == [plain.rank(asking(None, i), s) for i, s in enumerate(loads)])


def test_reports_correct_the_routers_record_but_keep_its_recent_sends(monkeypatch):
    index = AdapterIndex(slots=2)
    clock = [100.0]
    monkeypatch.setattr("moestack.routing.adapters.time.monotonic", lambda: clock[0])
    index.routed("r0", "a")
    index.routed("r0", "b")
    index.report("r0", ["c"])  # b and a were sent just now: the report may predate them
    assert set(index.held("r0")) == {"a", "b"}  # c added as least recent, then over 2 slots
    clock[0] += REPORT_GRACE_S + 1
    index.report("r0", ["b", "c"])
    assert set(index.held("r0")) == {"b", "c"}
    index.remove("b")
    assert index.held("r0") == ["c"] and index.holders("c", REPLICAS) == ["r0"]


def test_adapter_slots_follow_the_engine_args_and_reach_the_ray_router():
    assert adapter_slots({}) == 0
    assert adapter_slots({"enable_lora": True}) == 1
    assert adapter_slots({"enable_lora": True, "max_loras": 2}) == 2
    assert adapter_slots({"enable_lora": True, "max_loras": 2, "max_cpu_loras": 6}) == 6
    model = ModelConfig.model_validate(fake_model(engine_args={**LORA, "max_cpu_loras": 4}))
    config = request_router_config(model)
    assert config["request_router_kwargs"]["adapter_slots"] == 4
    assert config["request_router_kwargs"]["routing"]["adapter_affinity"] is True
    assert config["request_routing_stats_period_s"] > 0


# ---- replicas: load before serve, removal --------------------------------------------------

async def started(n: int = 1, **fake):
    config = ModelConfig.model_validate(fake_model(engine_args=LORA, fake=fake))
    engines = {f"r{i}": build_engine(config) for i in range(n)}
    for e in engines.values():
        await e.start()
    return config, engines


async def answer(chunks) -> tuple[int, bytes]:
    chunks = [c async for c in chunks]
    return chunks[0].status, b"".join(c.data for c in chunks)


async def test_concurrent_first_requests_load_the_adapter_once():
    config, engines = await started(adapter_load_s=0.05)
    backend = LocalBackend({config.name: engines["r0"]})
    answers = await asyncio.gather(*(answer(backend.serve(config.name, adapter_request(
        "sql-helper", f"q{i}"))) for i in range(8)))
    assert all(status == 200 and b"sql-helper.tok1" in body for status, body in answers)
    assert engines["r0"].adapter_loads == 1
    assert backend.adapters[config.name].loads == {"sql-helper": 1}
    assert engines["r0"].stats().adapters == frozenset({"sql-helper"})


async def test_a_request_for_an_evicted_adapter_loads_it_again():
    config, engines = await started()
    backend = LocalBackend({config.name: engines["r0"]})
    for name in ("a", "b", "c", "a"):  # two slots: c evicts a
        await answer(backend.serve(config.name, adapter_request(name, f"q-{name}")))
    assert backend.adapters[config.name].loads == {"a": 2, "b": 1, "c": 1}


async def test_an_adapter_the_engine_refuses_is_a_400_before_serving():
    config = ModelConfig.model_validate(fake_model())  # LoRA off
    engine = build_engine(config)
    await engine.start()
    backend = LocalBackend({config.name: engine})
    with pytest.raises(InvalidAdapterError) as failed:
        await answer(backend.serve(config.name, adapter_request("sql-helper", "q0")))
    assert failed.value.status_code == 400 and failed.value.param == "model"
    assert engine.requests_seen == []


async def test_removal_unloads_the_adapter_on_every_replica():
    config, engines = await started(n=3)
    replicas = ReplicaSet(engines, Router(config.routing, seed=1, adapter_slots=2))
    backend = ReplicaSetBackend({config.name: replicas})
    for rid, engine in engines.items():  # every replica holds it (as after spilled load)
        await replicas.adapters[rid].ensure(AdapterRef("sql-helper", "/adapters/sql-helper"))
        replicas.router.adapters.routed(rid, "sql-helper")
    await backend.remove_adapter(config.name, "sql-helper")
    assert all("sql-helper" not in e.stats().adapters and "sql-helper" not in e.adapter_paths
               for e in engines.values())
    assert replicas.router.adapters.holders("sql-helper", engines) == []


async def test_local_backend_removal_unloads_the_adapter():
    config, engines = await started()
    backend = LocalBackend({config.name: engines["r0"]})
    await answer(backend.serve(config.name, adapter_request("sql-helper", "q0")))
    await backend.remove_adapter(config.name, "sql-helper")
    assert engines["r0"].stats().adapters == frozenset()


async def test_replica_set_keeps_one_adapter_on_one_replica_with_affinity():
    config, engines = await started(n=2, token_interval_s=0.001)
    loads = {}
    for affinity in (True, False):
        for e in engines.values():
            for name in list(e.adapter_paths):
                await e.remove_adapter(name)
            e.adapter_loads = 0
        routing = RoutingConfig(adapter_affinity=affinity)
        replicas = ReplicaSet(engines, Router(routing, seed=2, adapter_slots=2))
        for i in range(24):  # three adapters, two slots per replica, one request at a time
            name = "abc"[i % 3]
            await answer(replicas.serve(adapter_request(name, f"q{affinity}{i}")))
        loads[affinity] = sum(e.adapter_loads for e in engines.values())
    assert loads[True] == 3, loads  # each adapter once, then always where it is held
    assert loads[False] > loads[True], loads
