"""The VTC fair queue alone, and two tenants contending through the gateway on the fake engine."""

import asyncio
import re
import statistics

import pytest

from moestack.scheduling.fair_queue import TIER_SPAN, FairQueue
from moestack.scheduling.shared_counters import SharedCounters
from moestack.tenancy import query_usage
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


async def test_running_requests_count_at_the_real_average_once_known_not_the_reservation():
    q = FairQueue(100)
    slots = [await q.acquire("a", 1.0, 0, 60) for _ in range(5)]  # cold start: reservations
    assert q.counters()["a"] == 300
    slots[0].release(14)
    # The four still running are re-estimated at the real size seen (14), not kept at 60: a
    # tenant whose first requests run long does not look served four times over.
    assert q.counters()["a"] == 14 + 4 * 14
    for s in slots[1:]:
        s.release(10)
    assert q.counters()["a"] == 54


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
    # (the 4 slots ending together on the fake engine, and one more while its ledger row is
    # committed by the store writer): a few, never the queue.
    assert len(ahead) >= 5 and len(heavy) > 3 * len(ahead)
    assert statistics.median(ahead) <= inflight + 1, ahead
    assert max(ahead) <= 2 * inflight < 20 - inflight, ahead


# -- dynamic engine priority ------------------------------------------------------------------


async def test_engine_priority_is_the_virtual_start_and_tiers_dominate():
    q = FairQueue(100, priority_step_tokens=10)
    light = await q.acquire("light", 1.0, 0, 10)  # keeps running: active, counter 10
    heavy = [await q.acquire("heavy", 1.0, 0, 10) for _ in range(20)]  # lifted to 0, then 200
    assert [s.priority for s in heavy] == list(range(20))  # its counter at each dispatch
    assert (await q.acquire("light", 1.0, 0, 10)).priority == 1  # ahead of heavy's later ones
    batch = await q.acquire("batch", 100.0, 2, 10)
    assert batch.priority // TIER_SPAN == 2  # tier dominates whatever the counters
    assert all(s.priority < TIER_SPAN for s in heavy)
    light.release(10)


async def test_an_earlier_request_is_not_overtaken_by_a_later_one_of_a_tenant_served_more():
    # vLLM keeps a request's priority while it waits: priorities must compare across time.
    q = FairQueue(100, priority_step_tokens=10)
    ahead = [await q.acquire("a", 1.0, 0, 10) for _ in range(3)]
    await q.acquire("b", 1.0, 0, 10)
    old = await q.acquire("a", 1.0, 0, 10)  # a is 3 steps ahead of b when this one starts
    more = [await q.acquire(t, 1.0, 0, 10) for t in ["b"] * 5 + ["a"] * 2]
    later = await q.acquire("b", 1.0, 0, 10)  # b was served past a's start of `old` since
    assert old.priority < later.priority, (old.priority, later.priority)
    for s in [*ahead, old, *more, later]:
        s.release(10)


async def test_static_priority_without_a_step_is_the_tier():
    q = FairQueue(4)
    assert (await q.acquire("t", 1.0, 3, 10)).priority == 3


async def test_virtual_start_is_capped_inside_the_tier():
    q = FairQueue(10_000, priority_step_tokens=1)
    (await q.acquire("heavy", 1.0, 1, 10)).release(2 * TIER_SPAN)
    slot = await q.acquire("heavy", 1.0, 1, 100)
    assert slot.priority == 2 * TIER_SPAN - 1


# -- counters shared across gateway replicas ----------------------------------------------------


def sync(shared, gateway, queue, epochs):
    epochs[gateway], merged = shared.sync(gateway, epochs.get(gateway), queue.sync_out())
    queue.sync_in(merged)


async def test_two_gateways_merge_their_counters_through_the_shared_counters():
    shared, epochs = SharedCounters(), {}
    gw_a, gw_b = FairQueue(100), FairQueue(100)
    held = [await gw_a.acquire("heavy", 1.0, 0, 100) for _ in range(5)]  # 500 running at a
    light = await gw_b.acquire("light", 1.0, 0, 10)
    sync(shared, "a", gw_a, epochs)
    sync(shared, "b", gw_b, epochs)
    # Gateway b now knows heavy's 500 running at a, and that heavy is active elsewhere.
    assert gw_b.counters()["heavy"] == 500 and gw_b._elsewhere == {"heavy": False}
    sync(shared, "a", gw_a, epochs)
    assert gw_a.counters() == {"heavy": 500, "light": 10}
    # Work between syncs is counted on top of the merged value.
    extra = await gw_b.acquire("heavy", 1.0, 0, 50)
    sync(shared, "a", gw_a, epochs)
    assert gw_b.counters()["heavy"] == 550
    sync(shared, "b", gw_b, epochs)
    sync(shared, "a", gw_a, epochs)
    assert gw_a.counters()["heavy"] == gw_b.counters()["heavy"] == 550
    # Released, the real tokens are settled on the shared counters (deltas), replacing estimates.
    for s in held:
        s.release(60)
    extra.release(40)
    sync(shared, "a", gw_a, epochs)
    sync(shared, "b", gw_b, epochs)
    sync(shared, "a", gw_a, epochs)
    assert gw_a.counters()["heavy"] == gw_b.counters()["heavy"] == 340 == shared.counters["heavy"]
    light.release(10)


async def test_a_new_gateway_adds_its_work_and_lost_shared_counters_take_the_maximum():
    shared, epochs = SharedCounters(), {}
    gw_a, gw_b = FairQueue(100), FairQueue(100)
    for gw in (gw_a, gw_b):  # each serves heavy before its first sync
        (await gw.acquire("heavy", 1.0, 0, 100)).release(100)
    sync(shared, "a", gw_a, epochs)
    sync(shared, "b", gw_b, epochs)
    assert shared.counters["heavy"] == 200  # both gateways' work, not the larger of the two
    sync(shared, "a", gw_a, epochs)
    assert gw_a.counters()["heavy"] == 200
    shared = SharedCounters()  # lost and recreated: each view already holds the other's work
    sync(shared, "a", gw_a, epochs)
    sync(shared, "b", gw_b, epochs)
    assert shared.counters["heavy"] == 200


async def test_lost_shared_counters_fall_back_to_local_ones_and_new_ones_are_reseeded():
    shared, epochs = SharedCounters(), {}
    gw_a, gw_b = FairQueue(100), FairQueue(100)
    for _ in range(3):
        (await gw_a.acquire("heavy", 1.0, 0, 100)).release(100)
    sync(shared, "a", gw_a, epochs)
    sync(shared, "b", gw_b, epochs)
    gw_b.sync_in(None)  # the shared counters are gone: b keeps what it knew and runs on its own
    assert gw_b.counters()["heavy"] == 300 and gw_b.shared_shares is None
    # Still served, never an outage; lifted to heavy's 300 (all idle: the largest counter).
    (await gw_b.acquire("light", 1.0, 0, 10)).release(10)
    for _ in range(2):
        (await gw_a.acquire("heavy", 1.0, 0, 100)).release(100)
    gw_a.sync_in(None)
    shared = SharedCounters()  # recreated: empty, new epoch
    sync(shared, "b", gw_b, epochs)
    sync(shared, "a", gw_a, epochs)
    assert shared.counters == {"heavy": 500, "light": 310}  # seeded by the maximum
    sync(shared, "b", gw_b, epochs)
    assert gw_b.counters() == {"heavy": 500, "light": 310}


async def test_shared_counters_lift_a_tenant_idle_everywhere_and_report_shares():
    shared, epochs = SharedCounters(), {}
    gw_a, gw_b = FairQueue(1), FairQueue(1)
    running = await gw_a.acquire("heavy", 1.0, 0, 100)
    waiting = asyncio.create_task(gw_a.acquire("heavy", 1.0, 0, 100))
    await asyncio.sleep(0)
    sync(shared, "a", gw_a, epochs)
    sync(shared, "b", gw_b, epochs)
    assert gw_b._elsewhere == {"heavy": True}  # backlogged at a
    late = await gw_b.acquire("late", 3.0, 0, 30)  # idle everywhere: lifted to heavy's 100
    assert gw_b.counters()["late"] == 110  # lifted to 100 settled, plus its own 30 / 3 running
    sync(shared, "b", gw_b, epochs)
    assert shared.counters["late"] == 100
    running.release(100)
    late.release(30)
    (await waiting).release(100)
    sync(shared, "a", gw_a, epochs)
    epoch, merged = shared.sync("b", epochs["b"], gw_b.sync_out())
    assert merged.shares == pytest.approx({"heavy": 200 / 230, "late": 30 / 230})
    assert merged.weight_shares == {}  # nobody active any more


async def test_tenants_coming_back_together_start_together_whichever_gateway_they_reach():
    shared, epochs = SharedCounters(), {}
    gw_a, gw_b = FairQueue(100), FairQueue(100)
    for gw, tenant, tokens in ((gw_a, "small", 500), (gw_b, "big", 3000)):
        (await gw.acquire(tenant, 1.0, 0, 10)).release(tokens)
        (await gw.acquire(tenant, 1.0, 0, 10)).release(0)  # a dispatched small last, b big
    for gw, name in ((gw_a, "a"), (gw_b, "b"), (gw_a, "a")):
        sync(shared, name, gw, epochs)
    # All idle. early1 reaches both gateways, early2 reaches a, then b once b knows it is
    # active at a (no lift there).
    held = [await gw_a.acquire("early1", 1.0, 0, 10), await gw_a.acquire("early2", 1.0, 0, 10),
            await gw_b.acquire("early1", 1.0, 0, 10)]
    for gw, name in ((gw_a, "a"), (gw_b, "b"), (gw_a, "a")):
        sync(shared, name, gw, epochs)
    held.append(await gw_b.acquire("early2", 1.0, 0, 10))
    sync(shared, "b", gw_b, epochs)
    # Lifted to the same place (the largest counter known to both), not to 500 at one gateway
    # and 3000 at the other: the one lifted higher would wait 2500 tokens for the other.
    for gw in (gw_a, gw_b):
        counters = gw.counters()
        assert abs(counters["early1"] - counters["early2"]) <= 20, counters
        assert counters["early1"] >= 3000, counters
    for s in held:
        s.release(10)


async def test_fairness_gauges_are_exported(tmp_path):
    config = fake_config(
        fake_model(MODEL), storage={"url": f"sqlite:///{tmp_path}/t.db"},
        tenancy={"enabled": True})
    async with local_stack(config) as stack:
        key = stack.tenancy.store.create_tenant("acme", weight=2.0)[1].plaintext
        await stack.openai(key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x y"}], max_tokens=3)
        text = (await stack.operator.get("/metrics")).text
    counter = re.search(r'moestack_fair_virtual_tokens\{model="fake-moe",tenant="acme"\} (\S+)',
                        text)
    assert counter and float(counter.group(1)) > 0
    assert 'moestack_fair_token_share_ratio{model="fake-moe",tenant="acme"} 1.0' in text
    assert "moestack_fair_shared_counters_up{" not in text  # no shared counters in-process


async def _fill_with(q, tenant, n):
    """``n`` slots held by ``tenant``, taken while nobody else is around."""
    return [await asyncio.wait_for(q.acquire(tenant, 1.0, 0, 10), 0.1) for _ in range(n)]


async def test_batch_reserve_lets_a_tenant_below_its_share_start_at_once():
    # 8 batch slots + 4 headroom, 1 reserved. The light tenant holds one slot; the heavy one
    # fills the batch up to the reserve and no further (no headroom either) while light is
    # present, so light's next request finds a free batch slot instead of queueing behind heavy.
    q = FairQueue(12, batch_slots=8, reserve_slots=1)
    light = await q.acquire("light", 1.0, 0, 10)
    await _fill_with(q, "heavy", 6)
    blocked = [asyncio.create_task(q.acquire("heavy", 1.0, 0, 10)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert q.inflight == 7 and q.waiting() == 5  # the 8th batch slot and the headroom kept
    second = await asyncio.wait_for(q.acquire("light", 1.0, 0, 10), 0.1)
    assert q.inflight == 8 and q.waiting() == 5
    light.release(10)
    await asyncio.sleep(0.01)
    # Light just freed a slot: it holds it for its next request, heavy does not ratchet into it.
    assert q.inflight == 7 and q.waiting() == 5
    third = await asyncio.wait_for(q.acquire("light", 1.0, 0, 10), 0.1)
    assert q.inflight == 8
    for task in blocked:
        task.cancel()
    await asyncio.gather(*blocked, return_exceptions=True)
    second.release(10)
    third.release(10)


async def test_batch_reserve_is_work_conserving_once_the_other_tenant_is_gone(monkeypatch):
    monkeypatch.setattr("moestack.scheduling.fair_queue.RESERVE_HOLD_S", 0.05)
    q = FairQueue(12, batch_slots=8, reserve_slots=1)
    assert len(await _fill_with(q, "heavy", 12)) == 12  # alone: every slot, headroom included
    q = FairQueue(12, batch_slots=8, reserve_slots=1)
    (await q.acquire("light", 1.0, 0, 10)).release(10)
    await _fill_with(q, "heavy", 6)
    more = [asyncio.create_task(q.acquire("heavy", 1.0, 0, 10)) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert q.inflight == 6  # light ended a moment ago: its slot and the reserve are kept
    await asyncio.wait_for(asyncio.gather(*more), 1.0)  # its hold ran out: heavy gets them all
    assert q.inflight == 12


async def test_batch_reserve_goes_to_the_tenant_below_its_weighted_share():
    q = FairQueue(8, batch_slots=8, reserve_slots=2)
    small = [await q.acquire("w1", 1.0, 0, 10)]  # w1's share: 8 x 1/4 = 2 slots
    big = [await q.acquire("w3", 3.0, 0, 10) for _ in range(5)]  # w3's share: 6 slots
    assert q.inflight == 6  # at the reserve now
    big.append(await asyncio.wait_for(q.acquire("w3", 3.0, 0, 10), 0.1))  # 5 < 6: below
    small.append(await asyncio.wait_for(q.acquire("w1", 1.0, 0, 10), 0.1))  # 1 < 2: below
    assert q.inflight == 8
    extra = asyncio.create_task(q.acquire("w3", 3.0, 0, 10))
    await asyncio.sleep(0.01)
    assert not extra.done()  # every slot taken
    extra.cancel()
    await asyncio.gather(extra, return_exceptions=True)
    for slot in small + big:
        slot.release(10)
