"""Cost of one fair-queue dispatch against the number of backlogged tenants, batch reserve on and off.

Every release of a request's slot runs the queue's fill step, which picks the next tenant to
dispatch; with the batch reserve on (the default) it also decides whether that tenant may take one
of the reserved slots. Both must cost time linear in the tenants present, not quadratic: this
benchmark backlogs N tenants (3 requests each) on one model's 64 dispatch slots, then releases
slots one at a time and times each release plus the dispatch it triggers.

Printed: microseconds per release at each N, reserve off and on, and the ratio to the smallest N
(linear scaling reads as about N / N_min).

    .venv/bin/python benchmarks/fair_dispatch_cost.py [--tenants 10,100,1000] [--releases 400]
        [--smoke]

``--smoke``: two small tenant counts and a few releases (the test suite's run).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from moestack.scheduling.fair_queue import FairQueue
from moestack.testing.benchmark_args import parse_with_smoke

SMOKE = {"tenants": "30,60", "releases": 25}
"""``--smoke``: the smallest run that still compares two tenant counts, each with more requests
than the 64 slots (so every timed release dispatches a waiter)."""


async def per_release_us(tenants: int, reserve_slots: int, releases: int) -> float:
    queue = FairQueue(max_inflight=64, priority_step_tokens=1.0, batch_slots=64,
                      reserve_slots=reserve_slots)
    waiters = [asyncio.ensure_future(queue.acquire(f"t{i % tenants}", 1.0 + i % 3, 0, 64))
               for i in range(3 * tenants)]
    await asyncio.sleep(0)
    pending = {id(w): w for w in waiters}
    running = []

    def collect() -> None:
        for key in [k for k, w in pending.items() if w.done()]:
            running.append(pending.pop(key).result())

    collect()
    elapsed, done = 0.0, 0
    while running and done < releases:
        slot = running.pop(0)
        start = time.perf_counter()
        slot.release(24)  # frees the slot and dispatches the next waiter
        elapsed += time.perf_counter() - start
        done += 1
        await asyncio.sleep(0)
        collect()
    for w in pending.values():
        w.cancel()
    await asyncio.sleep(0)
    return elapsed / done * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", default="10,100,1000")
    parser.add_argument("--releases", type=int, default=400)
    args = parse_with_smoke(parser, argv, SMOKE)
    counts = [int(n) for n in args.tenants.split(",")]
    rows = []
    for n in counts:
        print(f"  {n} backlogged tenants ...", flush=True)
        rows.append((n, asyncio.run(per_release_us(n, 0, args.releases)),
                     asyncio.run(per_release_us(n, 1, args.releases))))
    print(f"\n{'tenants':>8} {'reserve off us':>15} {'reserve on us':>14} "
          f"{'off / first':>12} {'on / first':>11} {'on / off':>9}")
    for n, off, on in rows:
        print(f"{n:8d} {off:15.1f} {on:14.1f} {off / rows[0][1]:12.1f} {on / rows[0][2]:11.1f} "
              f"{on / off:9.2f}")


if __name__ == "__main__":
    main()
