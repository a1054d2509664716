"""A small batch scheduler for the fake engine, shaped like vLLM's ``scheduling_policy: priority``.

vLLM runs at most ``max_num_seqs`` requests in one batch; the rest wait. With the priority policy
the waiting requests are ordered by ``(priority, arrival)`` (lower priority value first, then
first come, first served), and when vLLM must make room it preempts the running request that
sorts last by the same key; a preempted request goes back to the waiting queue and recomputes
its prefill when it runs again. vLLM preempts only when the KV cache runs out of blocks, not
merely because a better request waits for a batch slot; ``preempt=True`` models the case where
it does (a full KV cache), ``preempt=False`` (the default) the case where it does not.

Use: ``seq = scheduler.add(request_id, priority)``, then ``await seq.run()`` before the prefill
and before every decode step (it returns True when the request (re)entered the batch and must
compute its prefill), and ``seq.finish()`` in a ``finally`` (also for aborted requests).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler."""

    scheduler: BatchScheduler
    request_id: str
    priority: int
    arrival: int
    running: bool = False
    finished: bool = False
    preemptions: int = 0
    _needs_prefill: bool = True
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[int, int]:
        """Sort key of vLLM's priority policy: lower runs first."""
        return self.priority, self.arrival

    async def run(self) -> bool:
        """Wait until this request holds a batch slot; True if its prefill must be computed
        (first run, or back after a preemption)."""
        while not self.running:
            self._wake.clear()
            await self._wake.wait()
        needs, self._needs_prefill = self._needs_prefill, False
        return needs

    def finish(self) -> None:
        """The request is done or aborted: free its slot (idempotent)."""
        if not self.finished:
            self.finished = True
            self.scheduler._remove(self)


class BatchScheduler:
    """``max_num_seqs`` running slots and a waiting queue ordered by ``(priority, arrival)``."""

    def __init__(self, max_num_seqs: int, preempt: bool = False):
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.max_num_seqs, self.preempt = max_num_seqs, preempt
        self._arrivals = itertools.count()
        self._running: set[Sequence] = set()
        self._waiting: list[tuple[tuple[int, int], Sequence]] = []
        self.preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return sum(1 for _, s in self._waiting if not s.finished)

    def add(self, request_id: str, priority: int = 0) -> Sequence:
        seq = Sequence(self, request_id, priority, next(self._arrivals))
        heapq.heappush(self._waiting, (seq.key, seq))
        self._schedule()
        return seq

    def running_ids(self) -> list[str]:
        return sorted(s.request_id for s in self._running)

    def _remove(self, seq: Sequence) -> None:
        if seq.running:
            seq.running = False
            self._running.discard(seq)
        # A finished waiting sequence stays in the heap and is skipped when popped.
        self._schedule()

    def _start(self, seq: Sequence) -> None:
        seq.running = True
        self._running.add(seq)
        seq._wake.set()

    def _schedule(self) -> None:
        while self._waiting:
            key, best = self._waiting[0]
            if best.finished:
                heapq.heappop(self._waiting)
                continue
            if len(self._running) < self.max_num_seqs:
                heapq.heappop(self._waiting)
                self._start(best)
                continue
            if not self.preempt:
                return
            worst = max(self._running, key=lambda s: s.key)
            if worst.key <= key:
                return  # nobody running sorts after the best waiting one
            worst.running, worst._needs_prefill = False, True
            worst.preemptions += 1
            self.preemptions += 1
            self._running.discard(worst)
            heapq.heappush(self._waiting, (worst.key, worst))
