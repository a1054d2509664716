"""The store writer: group commits, deferred settlements flushed on time, refusals fail alone."""

import concurrent.futures
import time

import pytest
from sqlalchemy import text

from moestack.errors import RateLimitError
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.writer import StoreWriter


@pytest.fixture
def writer(tmp_path):
    store = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    w = StoreWriter(store, flush_interval_s=0.05, max_batch=100)
    yield w
    w.stop()
    store.close()


def bump(conn):
    conn.execute(text("UPDATE tenancy_version SET version = version + 1 WHERE id = 1"))


def test_a_deferred_write_is_flushed_within_the_interval_on_its_own(writer):
    writer.start()
    time.sleep(0.1)  # the thread is idle, waiting for work
    before = writer.store.version()
    started = time.monotonic()
    future = writer.submit(bump, deferred=True)
    future.result(timeout=2)
    assert writer.store.version() == before + 1
    assert 0.04 <= time.monotonic() - started < 1.0


def test_concurrent_writes_share_commits_and_a_refusal_fails_alone(writer):
    def refuse(conn):
        raise RateLimitError("no")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(lambda i: writer.submit(refuse if i == 7 else bump), range(200)))
    outcomes = [f.exception(timeout=10) for f in futures]
    assert isinstance(outcomes[7], RateLimitError)
    assert sum(o is None for o in outcomes) == 199
    assert writer.store.version() == 1 + 199
    assert writer.batches < 200  # group commit: fewer transactions than writes


def test_a_cancelled_waiter_queued_during_an_outage_does_not_stop_the_writer(writer):
    from sqlalchemy.exc import OperationalError

    from moestack.errors import StoreUnavailableError

    gate = concurrent.futures.Future()

    def outage(conn):  # holds the thread, then fails the batch as a store outage does
        gate.result(timeout=5)
        raise OperationalError("UPDATE ...", {}, Exception("database is locked"))

    first = writer.submit(outage)
    time.sleep(0.1)  # the thread runs `outage`; the next two wait in the queue
    cancelled, other = writer.submit(bump), writer.submit(bump)
    assert cancelled.cancel()
    gate.set_result(None)
    assert isinstance(first.exception(timeout=5), StoreUnavailableError)
    assert isinstance(other.exception(timeout=5), StoreUnavailableError)
    writer.flush(timeout_s=10)  # the writer thread is still alive and the store is back
    assert writer.store.version() == 1
    assert writer.submit(bump).result(timeout=5) is None and writer.store.version() == 2
