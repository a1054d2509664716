"""One writer thread per gateway process: the request path's writes, group-committed.

Every admission, settlement and heartbeat write of a gateway process is an *operation* (a function
of a Core connection) handed to :class:`StoreWriter`. Its thread takes everything queued (up to
``max_batch``), runs the operations in one transaction, in tenant-id order (the lock order every
writer follows, so gateways cannot deadlock), commits once, and then resolves each operation's
future. So:

* an admission's reservation is committed (durable) before its future resolves, i.e. before the
  engine sees the request; admissions arriving together share one commit (group commit) and one
  set of statements (:func:`moestack.tenancy.admission.admit_many`, a batched operation like the
  settlements), which is what lets one SQLite file take thousands of admissions a second;
* settlements are *deferred*: they wait up to ``flush_interval_s`` for company (or ride along
  with the next admission), and a batch that fails on a store error is kept and retried, in
  order, until the store is back; settling is idempotent, so a retry of a batch whose commit was
  in doubt bills nothing twice. A process crash before the flush leaves the row ``pending``; it is
  closed as ``lost`` keeping its reservation (an upper bound), as before batching;
* an operation that raises a :class:`~moestack.errors.MoestackError` (a 429, say) has written
  nothing (admission checks before it writes) and fails alone; a store error fails the batch and
  every urgent operation queued behind it with :class:`~moestack.errors.StoreUnavailableError`
  (503), so no request waits longer than about one bounded store wait (``busy_timeout_s``);
* any other failure (a value the database refuses, a bug) rolls the batch back and its
  operations are written again one per transaction: the others commit, the failing one alone
  fails, with :class:`~moestack.errors.StoreWriteError` (500, the cause logged), and its
  ``fallback`` runs in a transaction of its own (a failed settlement closes its row, so it
  leaves the tenant's in-flight count). One tenant's bad request can never fail another's
  admission or settlement.

There is no process-wide lock: readers (authentication, usage queries) never queue here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from moestack.errors import MoestackError, StoreUnavailableError, StoreWriteError
from moestack.tenancy import batch_sql, counters
from moestack.tenancy.store import UNAVAILABLE_MESSAGE, TenancyStore

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
"""Waits between retries of deferred operations while the store is unavailable."""


class Operation:
    """One write: ``fn(conn)``, or ``payload`` for ``batch_fn``; its waiter's future is a
    :class:`concurrent.futures.Future`, or an asyncio future of ``loop`` (resolved on the loop,
    one call per batch and loop rather than one thread-safe callback per future)."""

    __slots__ = ("fn", "tenant_id", "deferred", "batch_fn", "payload", "fallback", "loop",
                 "future", "queued_at")

    def __init__(self, fn: Callable[[Connection], Any] | None, tenant_id: int, deferred: bool,
                 batch_fn: Callable[[Connection, list], list] | None = None,
                 payload: Any = None, fallback: Callable[[Connection], Any] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.fn, self.tenant_id, self.deferred = fn, tenant_id, deferred
        self.batch_fn, self.payload = batch_fn, payload
        self.fallback = fallback
        """Run in a transaction of its own if the operation fails on its own (not an outage)."""
        self.loop = loop
        self.future: concurrent.futures.Future | asyncio.Future = (
            concurrent.futures.Future() if loop is None else loop.create_future())
        self.queued_at = time.monotonic()

    def start(self) -> bool:
        """Mark the operation running; False if its waiter gave up before it ran."""
        if self.loop is not None:
            return not self.future.cancelled()
        return self.future.running() or self.future.set_running_or_notify_cancel()


class StoreWriter:
    """Runs write operations on ``store`` in batched transactions on a thread of its own."""

    def __init__(self, store: TenancyStore, flush_interval_s: float = 0.02,
                 max_batch: int = 500):
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._urgent: collections.deque[Operation] = collections.deque()
        self._deferred: collections.deque[Operation] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failures = 0
        self._retry_at = 0.0
        self.batches = 0
        """Transactions committed (for benchmarks and tests)."""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="moestack-store-writer",
                                                daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> int:
        """Flush what is queued (within ``timeout_s``) and stop; returns the deferred operations
        left unwritten (the store was unavailable), which their rows' leases then close."""
        with self._cv:
            self._stopping = True
            self._retry_at = 0.0
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cv:
            left = len(self._deferred) + len(self._urgent)
            _deliver([(op, None, StoreUnavailableError(UNAVAILABLE_MESSAGE))
                      for op in [*self._urgent, *self._deferred]])
            self._urgent.clear()
            self._deferred.clear()
        return left

    def flush(self, timeout_s: float = 5.0) -> None:
        """Block until everything queued before this call is committed (tests, shutdown): an
        urgent no-op takes every queued settlement into its batch (retrying at once those
        that wait out a store failure); raises StoreUnavailableError if the store still fails."""
        with self._cv:
            self._retry_at = 0.0
        self.submit(lambda conn: None).result(timeout_s)

    def pending(self) -> int:
        """Operations queued and not yet committed."""
        with self._cv:
            return len(self._urgent) + len(self._deferred)

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, fn: Callable[[Connection], Any], tenant_id: int = 0,
               deferred: bool = False) -> concurrent.futures.Future:
        """Queue ``fn(conn)``; the future resolves after the commit of its batch. ``deferred``
        operations are batched for up to ``flush_interval_s`` and retried on store errors."""
        return self._queue(Operation(fn, tenant_id, deferred))

    def submit_batched(self, batch_fn: Callable[[Connection, list], list], payload: Any,
                       tenant_id: int = 0, deferred: bool = True,
                       fallback: Callable[[Connection], Any] | None = None,
                       loop: asyncio.AbstractEventLoop | None = None
                       ) -> concurrent.futures.Future | asyncio.Future:
        """Queue ``payload`` for ``batch_fn(conn, payloads) -> results``, called once per
        transaction with every payload of that function in the batch (settlements: a few
        statements per batch instead of a few per row). ``fallback(conn)`` runs instead if
        this payload's write fails on its own. With ``loop`` (called on that loop's thread),
        the result is an asyncio future of the loop, cheaper to wait for than a wrapped
        concurrent one."""
        return self._queue(Operation(None, tenant_id, deferred, batch_fn, payload,
                                     fallback=fallback, loop=loop))

    def _queue(self, op: Operation) -> concurrent.futures.Future | asyncio.Future:
        deferred = op.deferred
        with self._cv:
            (self._deferred if deferred else self._urgent).append(op)
            # Wake the thread for urgent work, a full batch, or the first deferred operation
            # (it then sleeps until that one's flush time).
            if not deferred or len(self._deferred) in (1, self.max_batch):
                self._cv.notify()
        self.start()
        return op.future

    # -- the thread -----------------------------------------------------------------------------

    def _take(self) -> list[Operation] | None:
        with self._cv:
            while True:
                now = time.monotonic()
                deferred_due = bool(self._deferred) and now >= self._retry_at and (
                    self._stopping or len(self._deferred) >= self.max_batch
                    or now - self._deferred[0].queued_at >= self.flush_interval_s)
                if self._urgent or deferred_due:
                    break
                if self._stopping:
                    return None
                wait = None
                if self._deferred:
                    wait = max(self._retry_at, self._deferred[0].queued_at
                               + self.flush_interval_s) - now
                self._cv.wait(timeout=max(wait, 0.001) if wait is not None else None)
            batch = [self._urgent.popleft()
                     for _ in range(min(len(self._urgent), self.max_batch))]
            if now >= self._retry_at:
                room = self.max_batch - len(batch)
                batch += [self._deferred.popleft()
                          for _ in range(min(len(self._deferred), room))]
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._write(batch)

    def _write(self, batch: list[Operation]) -> None:
        # Skip operations whose waiter gave up before they ran (a cancelled heartbeat, say).
        batch = [op for op in batch if op.start()]
        if not batch:
            return
        try:
            results = self._commit(batch)
        except StoreUnavailableError as exc:
            self._failed(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._failed_alone(batch[0], exc)
                return
            # One operation (which, we cannot tell) failed the transaction: the rest must not
            # pay for it. Write each on its own; only the failing one fails.
            log.warning("tenancy store writer: a batch of %d failed (%s); writing its "
                        "operations one by one", len(batch), type(exc).__name__)
            self._one_by_one(batch)
            return
        except BaseException as exc:  # interpreter shutdown: tell every waiter
            _deliver([(op, None, exc) for op in batch])
            raise
        self._resolve(results)

    def _commit(self, batch: list[Operation]) -> list[tuple[Operation, Any, Exception | None]]:
        """Run ``batch`` in one transaction, in tenant-id order; its results once committed."""
        results: list[tuple[Operation, Any, Exception | None]] = []
        with self.store.begin() as conn:
            # Every operation locks its tenants' counters first; with several tenants in the
            # batch they are all locked here first, in id order (one tenant: nothing to order).
            tenants = {op.tenant_id for op in batch if op.tenant_id}
            if len(tenants) > 1:
                counters.lock_many(conn, tenants)
            ordered = sorted(batch, key=lambda o: o.tenant_id)  # stable: keeps arrival order
            grouped: dict[Callable, list[Operation]] = {}
            for op in ordered:
                if op.batch_fn is not None:
                    grouped.setdefault(op.batch_fn, []).append(op)
            # Deferred batched operations (settlements) first: a request that has finished
            # leaves the in-flight count before the admissions in the same batch are checked.
            # A batch function refuses one payload by returning its MoestackError (written
            # nothing for it).
            # They share their statements (one batch function's writes go with the next one's
            # reads, see moestack.tenancy.batch_sql), all sent before the other operations run.
            with batch_sql.sharing(conn):
                for batch_fn, ops in sorted(grouped.items(),
                                            key=lambda kv: not kv[1][0].deferred):
                    values = batch_fn(conn, [op.payload for op in ops])
                    results.extend((op, None, v) if isinstance(v, MoestackError)
                                   else (op, v, None) for op, v in zip(ops, values))
            for op in ordered:
                if op.batch_fn is not None:
                    continue
                try:
                    results.append((op, op.fn(conn), None))
                except MoestackError as exc:  # a refusal: the operation wrote nothing
                    results.append((op, None, exc))
        return results

    def _resolve(self, results: list[tuple[Operation, Any, Exception | None]]) -> None:
        self.batches += 1
        self._failures = 0
        _deliver(results)

    def _one_by_one(self, batch: list[Operation]) -> None:
        for i, op in enumerate(batch):
            try:
                results = self._commit([op])
            except StoreUnavailableError as exc:  # the store went away meanwhile
                self._failed(batch[i:], exc)
                return
            except Exception as exc:
                self._failed_alone(op, exc)
                continue
            self._resolve(results)

    def _failed_alone(self, op: Operation, exc: Exception) -> None:
        """``op`` failed in a transaction of its own: run its fallback, fail its waiter."""
        log.error("tenancy store writer: a write failed on its own and was rolled back "
                  "(tenant id %d): %s: %.300s", op.tenant_id, type(exc).__name__, exc)
        if op.fallback is not None:
            fallback = Operation(op.fallback, op.tenant_id, op.deferred)
            try:
                self._commit([fallback])
            except Exception:  # fail open on purpose: the row's lease still closes it as lost
                log.exception("tenancy store writer: the fallback of a failed write failed too")
        error = StoreWriteError("The request could not be recorded in the usage ledger, so it "
                                "was not served.")
        error.__cause__ = exc
        _deliver([(op, None, error)])

    def _failed(self, batch: list[Operation], exc: StoreUnavailableError) -> None:
        cause = exc.__cause__
        log.warning("tenancy store unavailable (%s); %d queued writes kept for retry",
                    type(cause).__name__ if cause else "error",
                    sum(op.deferred for op in batch) + len(self._deferred))
        with self._cv:
            # Urgent operations (admissions) fail at once, with those queued behind them: they
            # would meet the same wait. Deferred ones (settlements) go back to the front.
            urgent = [op for op in batch if not op.deferred] + list(self._urgent)
            self._urgent.clear()
            self._deferred.extendleft(reversed([op for op in batch if op.deferred]))
            self._retry_at = time.monotonic() + RETRY_BACKOFF_S[
                min(self._failures, len(RETRY_BACKOFF_S) - 1)]
            self._failures += 1
        _deliver([(op, None, StoreUnavailableError(UNAVAILABLE_MESSAGE)) for op in urgent])


def _deliver(results: list[tuple[Operation, Any, BaseException | None]]) -> None:
    """Resolve operations' futures (a value, or the exception when not None), unless their
    waiters cancelled them (a queued operation has not started, so its waiter may): a cancelled
    future must not stop the writer thread. Asyncio futures are resolved on their loop, with
    one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for op, value, exc in results:
        if op.loop is not None:
            by_loop.setdefault(op.loop, []).append((op.future, value, exc))
            continue
        future = op.future
        if future.cancelled():
            continue
        try:
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_on_loop, items)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _resolve_on_loop(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, value, exc in items:
        if future.done():  # cancelled by its waiter
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)
