"""The fake engine's batch scheduler: vLLM's priority policy over ``max_num_seqs`` slots."""

import asyncio

import pytest

from moestack.testing import fake_config, fake_model
from moestack.testing.fake_engine import FakeEngine
from moestack.testing.fake_scheduler import BatchScheduler
from moestack.testing.requests import engine_request


async def test_runs_at_most_max_num_seqs():
    s = BatchScheduler(2)
    seqs = [s.add(f"r{i}") for i in range(4)]
    assert [q.running for q in seqs] == [True, True, False, False]
    assert s.num_running == 2 and s.num_waiting == 2


async def test_waiting_requests_start_by_priority_then_arrival():
    s = BatchScheduler(1)
    seqs = {rid: s.add(rid, prio) for rid, prio in
            (("first", 5), ("b1", 3), ("b2", 3), ("worse", 7), ("best", 0))}
    order = []
    while s.num_running:
        (rid,) = s.running_ids()
        order.append(rid)
        seqs[rid].finish()
    assert order == ["first", "best", "b1", "b2", "worse"]


async def test_finished_waiting_request_never_runs():
    s = BatchScheduler(1)
    a = s.add("a")
    b = s.add("b")
    b.finish()
    a.finish()
    assert s.num_running == 0 and s.num_waiting == 0


async def test_preempts_worst_running_request_for_a_better_one():
    s = BatchScheduler(2, preempt=True)
    low1, low2 = s.add("low1", 9), s.add("low2", 9)
    assert await low1.run() and await low2.run()  # both computed their prefill
    high = s.add("high", 0)
    assert high.running and not low2.running and low1.running  # the later of equals goes
    assert s.preemptions == 1 and low2.preemptions == 1
    high.finish()
    assert low2.running
    assert await low2.run() is True  # back in the batch: prefill again
    assert await low1.run() is False


async def test_no_preemption_without_the_flag_or_for_equal_priority():
    s = BatchScheduler(1)
    low = s.add("low", 9)
    s.add("high", 0)
    assert low.running and s.preemptions == 0
    t = BatchScheduler(1, preempt=True)
    a = t.add("a", 1)
    t.add("b", 1)
    assert a.running and t.preemptions == 0


async def test_run_waits_for_a_slot():
    s = BatchScheduler(1)
    a, b = s.add("a"), s.add("b")
    waiter = asyncio.create_task(b.run())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    a.finish()
    assert await asyncio.wait_for(waiter, 1) is True


def test_rejects_empty_batch():
    with pytest.raises(ValueError):
        BatchScheduler(0)


async def test_fake_engine_batch_holds_max_num_seqs_and_orders_by_priority():
    config = fake_config(fake_model(fake={"max_num_seqs": 2, "token_interval_s": 0.01}))
    engine = FakeEngine(config.models[0])
    await engine.start()
    started: list[str] = []

    async def one(rid, priority):
        req = engine_request({"prompt": "a b", "max_tokens": 3, "stream": True,
                              "priority": priority}, request_id=rid)
        first = True
        async for _ in engine.serve(req):
            if first:
                started.append(rid)
                first = False
            assert engine.scheduler.num_running <= 2

    tasks = [asyncio.create_task(one(f"low{i}", 5)) for i in range(3)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(one("high", 0)))
    await asyncio.gather(*tasks)
    # low0 and low1 took the batch; the high-priority request goes before the waiting low2.
    assert started == ["low0", "low1", "high", "low2"]
