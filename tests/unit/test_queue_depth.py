"""Gateway fair-queue depth reaching the autoscaler, and fair-queue slots following replicas."""

import asyncio

from moestack.config import parse_config
from moestack.config.schema import RoutingConfig
from moestack.routing.router import Router
from moestack.routing.prefix import block_hashes
from moestack.routing.types import RoutingRequest
from moestack.scheduling import Scheduler, capacity
from moestack.scheduling.fair_queue import FairQueue
from moestack.scheduling.queue_depth import STALE_AFTER_S, QueueDepthBoard
from moestack.testing import fake_model


def test_board_sums_gateways_and_drops_those_that_stopped_reporting():
    board = QueueDepthBoard()
    board.report("gw-a", {"m": 5, "n": 1}, now_s=100.0)
    board.report("gw-b", {"m": 2}, now_s=104.0)
    assert (board.waiting("m", now_s=105.0), board.waiting("n", now_s=105.0)) == (7, 1)
    board.report("gw-a", {"m": 0}, now_s=106.0)  # the latest report replaces the previous one
    assert board.waiting("m", now_s=106.0) == 2
    assert board.waiting("m", now_s=104.0 + STALE_AFTER_S + 1) == 0  # gw-b went silent
    assert board.waiting("unknown", now_s=106.0) == 0


async def test_more_slots_dispatch_the_waiting_requests_at_once():
    queue = FairQueue(max_inflight=1)
    first = await queue.acquire("t", 1.0, 0, 10)
    waiting = [asyncio.create_task(queue.acquire("t", 1.0, 0, 10)) for _ in range(3)]
    await asyncio.sleep(0)
    assert queue.waiting() == 3
    queue.set_capacity(3)  # two more replicas came up
    await asyncio.sleep(0)
    assert queue.waiting() == 1 and queue.inflight == 3
    queue.set_capacity(0)  # never below one slot; running requests are not taken back
    assert queue.max_inflight == 1
    first.release(10)
    for slot in [t.result() for t in waiting if t.done()]:
        slot.release(10)
    await asyncio.sleep(0)
    assert queue.waiting() == 0  # the last waiter got the slot freed under the smaller limit
    assert queue.inflight == 1


def _scheduler(fair_queue=None, gateways=1, **model):
    config = parse_config({
        "models": [fake_model("m", max_ongoing_requests=16, **model)],
        "gateway": {"num_replicas": gateways},
        "tenancy": {"enabled": True,
                    "fair_queue": {"headroom_ratio": 0.0, **(fair_queue or {})}}})
    return Scheduler(config)


def test_dispatch_slots_follow_live_replicas_shared_by_the_gateways():
    scheduler = _scheduler(num_replicas=2)
    assert scheduler.queue("m").max_inflight == 32  # 2 configured replicas x 16
    scheduler.follow_replicas("m", 5)
    assert scheduler.queue("m").max_inflight == 80
    scheduler.follow_replicas("m", 0)  # scaled to zero: one replica's worth reaches Serve
    assert scheduler.queue("m").max_inflight == 16
    three = _scheduler(gateways=3, num_replicas=2)
    assert capacity.dispatch_slots(three.config, "m") == 11  # ceil(32/3)
    scaled = _scheduler(autoscaling={"enabled": True, "min_replicas": 0,
                                     "initial_replicas": 0, "max_replicas": 4})
    assert capacity.dispatch_slots(scaled.config, "m") == 16
    fixed = _scheduler(fair_queue={"max_inflight_requests_per_model": 4})
    fixed.follow_replicas("m", 5)
    assert fixed.queue("m").max_inflight == 4  # configured: does not follow


def test_router_counts_expected_prefix_hits():
    router = Router(RoutingConfig(policy="prefix_affinity", prefix_block_chars=8), seed=1)
    blocks = block_hashes("system prompt shared by all " * 4, 8)
    for i, replica in enumerate(["r1", "r1", "r2"]):
        router.routed(RoutingRequest(f"q{i}", blocks, 100), replica)
    c = router.counts
    assert (c.requests, c.prefix_hits) == (3, 1)  # only the second went where the prefix was
    assert (c.prompt_blocks, c.matched_blocks) == (3 * len(blocks), len(blocks))


def test_batch_reserve_is_shared_by_the_gateways_and_follows_replicas():
    scheduler = _scheduler(gateways=2, fair_queue={"headroom_ratio": 0.5,
                                                   "batch_slots_per_replica": 32,
                                                   "reserve_batch_slots_per_replica": 2})
    queue = scheduler.queue("m")
    assert (queue.max_inflight, queue.batch_slots, queue.reserve_slots) == (24, 16, 1)
    scheduler.follow_replicas("m", 3)
    assert (queue.max_inflight, queue.batch_slots, queue.reserve_slots) == (72, 48, 3)
    off = _scheduler(fair_queue={"reserve_batch_slots_per_replica": 0}).queue("m")
    assert off.reserve_slots == 0
