"""The VTC fair queue alone, and two tenants contending through the gateway on the fake engine."""

import asyncio
import statistics

import pytest

from moestack.tenancy import query_usage
from moestack.tenancy.fair import FairQueue
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack


async def drain(queue, demands, rounds):
    """Every tenant keeps ``demands[t] = (weight, priority, cost)`` backlogged; returns the order
    in which ``rounds`` requests were dispatched."""
    order = []

    async def worker(tenant, weight, priority, cost):
        while len(order) < rounds:
            slot = await queue.acquire(tenant, weight, priority, cost)
            order.append(tenant)
            await asyncio.sleep(0)
            slot.release(cost)

    tasks = [asyncio.create_task(worker(t, *d)) for t, d in demands.items()
             for _ in range(4)]
    while len(order) < rounds:
        await asyncio.sleep(0.001)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return order[:rounds]


async def test_backlogged_tenants_get_tokens_in_proportion_to_weight():
    order = await drain(FairQueue(1), {"a": (1.0, 0, 10), "b": (3.0, 0, 10)}, 400)
    assert order.count("b") / order.count("a") == pytest.approx(3.0, rel=0.1)


async def test_share_is_counted_in_tokens_not_requests():
    order = await drain(FairQueue(1), {"big": (1.0, 0, 40), "small": (1.0, 0, 10)}, 400)
    assert order.count("small") / order.count("big") == pytest.approx(4.0, rel=0.1)


async def test_better_priority_tier_goes_first():
    order = await drain(FairQueue(1), {"batch": (10.0, 5, 10), "online": (1.0, 0, 10)}, 50)
    assert order[5:].count("batch") == 0


async def test_work_conserving_lone_tenant_never_waits():
    q = FairQueue(2)
    slots = [await asyncio.wait_for(q.acquire("a", 1.0, 0, 10), 0.1) for _ in range(2)]
    waiter = asyncio.create_task(q.acquire("a", 1.0, 0, 10))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    slots[0].release(10)
    assert (await asyncio.wait_for(waiter, 0.1)).tenant == "a"


async def test_idle_tenant_does_not_bank_credit():
    q = FairQueue(1)
    for _ in range(50):
        (await q.acquire("busy", 1.0, 0, 10)).release(10)
    held = await q.acquire("busy", 1.0, 0, 10)
    busy = [asyncio.create_task(q.acquire("busy", 1.0, 0, 10)) for _ in range(3)]
    await asyncio.sleep(0)
    late = [asyncio.create_task(q.acquire("late", 1.0, 0, 10)) for _ in range(3)]
    await asyncio.sleep(0)
    # Without the lift "late" would start at 0 and take the next 50 turns; lifted, it alternates.
    assert q.counters()["late"] == q.counters()["busy"]
    order, slot = [], held
    for _ in range(6):
        slot.release(10)
        await asyncio.sleep(0)
        slot = next(t.result() for t in busy + late if t.done() and t.result() not in order)
        order.append(slot)
    assert [s.tenant for s in order] == ["busy", "late"] * 3


async def test_cancelled_waiter_leaves_the_queue():
    q = FairQueue(1)
    held = await q.acquire("a", 1.0, 0, 10)
    waiter = asyncio.create_task(q.acquire("b", 1.0, 0, 10))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert q.waiting() == 0
    held.release(10)
    assert q.inflight == 0


MODEL = "fake-moe"


async def heavy_requests_ahead_of_light(stack, keys, heavy_workers, seconds, max_tokens=8):
    """Light sends one request at a time while heavy keeps ``heavy_workers`` in flight. For each
    light request: how many requests the engine started between its arrival and its own start
    (the fake engine records requests in the order it starts them)."""
    engine, stop, ahead = stack.engines[MODEL], asyncio.Event(), []

    async def loop(key, record):
        client = stack.openai(key)
        while not stop.is_set():
            started_before = len(engine.requests_seen)
            resp = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=max_tokens)
            if record:
                ids = [r.request_id for r in engine.requests_seen]
                ahead.append(ids.index(resp.id.removeprefix("chatcmpl-")) - started_before)

    tasks = [asyncio.create_task(loop(keys["light"], True))]
    tasks += [asyncio.create_task(loop(keys["heavy"], False)) for _ in range(heavy_workers)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return ahead


async def test_light_tenant_is_served_next_although_heavy_sends_ten_times_more(tmp_path):
    inflight = 4
    config = fake_config(
        fake_model(MODEL, fake={"ttft_s": 0.05, "token_interval_s": 0.02}),
        storage={"url": f"sqlite:///{tmp_path}/t.db"},
        tenancy={"enabled": True, "fair_queue": {"max_inflight_requests_per_model": inflight}})
    async with local_stack(config) as stack:
        keys = {name: stack.tenancy.store.create_tenant(name)[1].plaintext
                for name in ("light", "heavy")}
        ahead = await heavy_requests_ahead_of_light(stack, keys, heavy_workers=20, seconds=3.0)
        heavy = query_usage(stack.tenancy.store, tenant="heavy")
    # 20 heavy requests compete for 4 slots, so about 16 are always queued: FIFO would start all
    # of them before a light request. VTC gives the light request the next free slot; what starts
    # ahead of it is what was already picked while it went through authentication and admission
    # (the 4 slots ending together on the fake engine): a few, never the queue.
    assert len(ahead) >= 5 and len(heavy) > 3 * len(ahead)
    assert statistics.median(ahead) <= inflight, ahead
    assert max(ahead) <= 2 * inflight < 20 - inflight, ahead
