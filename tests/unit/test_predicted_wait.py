"""The fair queue's prediction of a new request's wait, from its state (no Ray, fake clock)."""

import asyncio

import pytest

from moestack.config import parse_config
from moestack.scheduling import Scheduler
from moestack.scheduling.fair_queue import FairQueue
from moestack.testing import fake_model


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _busy_queue(clock: Clock) -> tuple[FairQueue, list, list[asyncio.Task]]:
    """Two slots held by ``a`` after two requests held a slot 4 s each; ``a`` has 3 requests
    waiting, ``b`` 2 (weights 1, tier 0)."""
    queue = FairQueue(max_inflight=2, clock=clock)
    first = [await queue.acquire("a", 1.0, 0, 10) for _ in range(2)]
    clock.now = 4.0
    for slot in first:
        slot.release(10)
    held = [await queue.acquire("a", 1.0, 0, 10) for _ in range(2)]
    waiters = [asyncio.create_task(queue.acquire(t, 1.0, 0, 10)) for t in "aaabb"]
    await asyncio.sleep(0)
    assert queue.waiting() == 5 and queue.mean_hold_s == 4.0
    return queue, held, waiters


async def _cancel(waiters: list[asyncio.Task]) -> None:
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_no_wait_while_a_slot_is_free_and_nobody_waits():
    queue = FairQueue(max_inflight=2)
    slot = await queue.acquire("a", 1.0, 0, 10)
    assert queue.predicted_wait_s("b", 1.0, 0) == 0.0
    assert queue.predicted_wait_s("a", 1.0, 0) == 0.0
    slot.release(10)


async def test_wait_is_unknown_while_every_slot_is_taken_and_none_was_ever_freed():
    queue = FairQueue(max_inflight=1)
    slot = await queue.acquire("a", 1.0, 0, 10)
    assert queue.predicted_wait_s("b", 1.0, 0) is None
    slot.release(0)  # a request that did no work says nothing of how long slots are held
    slot = await queue.acquire("a", 1.0, 0, 10)
    assert queue.predicted_wait_s("b", 1.0, 0) is None
    slot.release(10)


async def test_wait_counts_the_own_backlog_and_the_others_in_proportion_to_weight():
    clock = Clock()
    queue, held, waiters = await _busy_queue(clock)
    # b's next request: its own 2 first, and a gets as many turns meanwhile (3 of its 3): 5
    # requests ahead, 6 slots to free at 2 slots per 4 s.
    assert queue.predicted_wait_s("b", 1.0, 0) == pytest.approx(6 * 4.0 / 2)
    # A newcomer of weight 1 goes after one of a's and one of b's: 3 slots to free.
    assert queue.predicted_wait_s("c", 1.0, 0) == pytest.approx(3 * 4.0 / 2)
    # Of weight 3, it waits for a third of a turn of each.
    assert queue.predicted_wait_s("c", 3.0, 0) == pytest.approx((1 + 2 / 3) * 4.0 / 2)
    await _cancel(waiters)
    for slot in held:
        slot.release(10)


async def test_better_tiers_go_first_and_worse_tiers_are_not_waited_for():
    clock = Clock()
    queue, held, waiters = await _busy_queue(clock)
    assert queue.predicted_wait_s("c", 1.0, 1) == pytest.approx(6 * 4.0 / 2)  # all 5 ahead
    tier1 = asyncio.create_task(queue.acquire("c", 1.0, 1, 10))
    await asyncio.sleep(0)
    assert queue.predicted_wait_s("d", 1.0, 0) == pytest.approx(3 * 4.0 / 2)  # c is behind
    await _cancel([*waiters, tier1])
    for slot in held:
        slot.release(10)


async def test_the_scheduler_predicts_per_model():
    scheduler = Scheduler(parse_config({"models": [fake_model("m", max_ongoing_requests=1)],
                                        "tenancy": {"fair_queue": {"headroom_ratio": 0.0}}}))
    assert scheduler.predicted_wait_s("m", "a", 1.0, 0) == 0.0
    slot = await scheduler.acquire("m", "a", 1.0, 0, 10)
    assert slot.priority >= 0 and scheduler.predicted_wait_s("m", "b", 1.0, 0) is None
    slot.release(10)
