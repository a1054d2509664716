"""The store writer isolates a failing operation: the rest of its batch commits, the failing one
fails alone with a clear error, and a failed settlement leaves neither a `pending` row nor a
leaked in-flight count (SQLite; the same on PostgreSQL in tests/integration)."""

import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError

from moestack.errors import RateLimitError, StoreWriteError
from moestack.tenancy import ledger
from moestack.tenancy.admission import Reservation, admit_in, authenticate
from moestack.tenancy.ledger import Settlement
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.writer import StoreWriter
from moestack.usage import RequestRecord


@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


def held_writer(store, max_batch=100):
    """A writer whose thread waits until ``release`` is set, so the test fills one batch."""
    writer = StoreWriter(store, flush_interval_s=0.01, max_batch=max_batch)
    release = threading.Event()
    writer.submit(lambda conn: release.wait(10))  # the thread blocks in this first batch
    return writer, release


def bump(conn):
    conn.execute(text("UPDATE tenancy_version SET version = version + 1 WHERE id = 1"))


def overflow(conn):
    """Writes, then fails as an out-of-range value does (SQLite: OverflowError)."""
    bump(conn)
    conn.execute(text("UPDATE tenancy_version SET version = :v WHERE id = 1"), {"v": 2**70})


def admit_op(principal, request_id, tokens):
    return lambda conn: admit_in(conn, principal, reservation=Reservation(request_id, tokens, 0.0),
                                 model="m", endpoint="completions", stream=False,
                                 gateway_id="gw", lease_s=60)


def inflight(store, tenant_id):
    with store.read() as conn:
        return conn.execute(text("SELECT inflight FROM tenant_counters WHERE tenant_id = :t"),
                            {"t": tenant_id}).scalar()


def states(store):
    with store.read() as conn:
        return dict(conn.execute(text("SELECT request_id, state FROM usage_ledger")).all())


def test_one_failing_operation_fails_alone_and_the_rest_of_its_batch_commits(store):
    writer, release = held_writer(store)
    before = store.version()
    futures = [writer.submit(overflow if i == 3 else bump) for i in range(10)]
    refused = writer.submit(lambda conn: (_ for _ in ()).throw(RateLimitError("no")))
    release.set()
    outcomes = [f.exception(timeout=10) for f in futures]
    assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 3 + ["StoreWriteError"] + [
        "NoneType"] * 6
    error = outcomes[3]
    assert error.status_code == 500 and error.code == "store_write_failed"
    # The driver's error (SQLite: OverflowError; PostgreSQL: DataError) is logged, never shown.
    assert isinstance(error.__cause__, (OverflowError, DataError))
    assert str(2**70) not in error.message
    assert isinstance(refused.exception(timeout=10), RateLimitError)
    assert store.version() == before + 9  # the failing one's own bump was rolled back
    writer.stop()


def test_a_failing_admission_next_to_others_leaves_no_row_and_no_in_flight_count(store):
    _, victim_key = store.create_tenant("victim", max_concurrent_requests=4)
    _, attacker_key = store.create_tenant("attacker")
    victim = authenticate(store, victim_key.plaintext)
    attacker = authenticate(store, attacker_key.plaintext)
    writer, release = held_writer(store)
    ok = [writer.submit(admit_op(victim, f"v{i}", 10), victim.tenant_id) for i in range(3)]
    # 2^70 tokens: past any 64-bit column (the gateway refuses it before; here it gets through).
    bad = writer.submit(admit_op(attacker, "a0", 2**70), attacker.tenant_id)
    release.set()
    assert [f.exception(timeout=10) for f in ok] == [None] * 3
    assert isinstance(bad.exception(timeout=10), StoreWriteError)
    assert states(store) == {"v0": "pending", "v1": "pending", "v2": "pending"}
    assert (inflight(store, victim.tenant_id), inflight(store, attacker.tenant_id)) == (3, 0)
    writer.stop()


def record(request_id, prompt=3, completion=4):
    return RequestRecord(request_id=request_id, model="m", endpoint="completions", stream=False,
                         status_code=200, prompt_tokens=prompt, completion_tokens=completion,
                         cached_prompt_tokens=0, ttft_s=0.01, e2e_s=0.02)


def test_a_failing_settlement_is_closed_by_its_fallback_and_the_others_settle(store):
    _, key = store.create_tenant("t", max_concurrent_requests=3)
    p = authenticate(store, key.plaintext)
    writer = StoreWriter(store, flush_interval_s=0.01)
    for i in range(3):
        writer.submit(admit_op(p, f"r{i}", 10), p.tenant_id).result(timeout=10)
    assert inflight(store, p.tenant_id) == 3
    writer2, release = held_writer(store)
    futures = []
    for i in range(3):
        bad = i == 1  # usage no 64-bit column holds: settle_many fails for the batch
        s = Settlement(record(f"r{i}", prompt=2**70 if bad else 3), 0.0)
        futures.append(writer2.submit_batched(
            ledger.settle_many, s, p.tenant_id,
            fallback=lambda conn, rid=f"r{i}": ledger.close_unsettled(conn, [rid])))
    release.set()
    outcomes = [f.exception(timeout=10) for f in futures]
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], StoreWriteError)
    assert states(store) == {"r0": "settled", "r1": "lost", "r2": "settled"}
    [lost] = [r for r in ledger.query_usage(store) if r.request_id == "r1"]
    assert lost.error_code == "settle_failed" and lost.charged_tokens == 10  # reservation kept
    assert inflight(store, p.tenant_id) == 0  # nothing leaks: the tenant is not locked out
    writer.stop()
    writer2.stop()


def test_the_lease_renewal_skips_rows_no_longer_running(store):
    _, key = store.create_tenant("t")
    p = authenticate(store, key.plaintext)
    with store.begin() as conn:
        for rid in ("running", "finished"):
            admit_op(p, rid, 10)(conn)
    with store.begin() as conn:
        assert ledger.renew_leases(conn, "gw", 60, ["running"]) == 1
        assert ledger.renew_leases(conn, "gw", 60, []) == 0
        assert ledger.renew_leases(conn, "gw", 60) == 2


async def test_through_the_gateway_a_failed_settlement_does_not_lock_the_tenant_out(
        tmp_path, monkeypatch):
    from moestack.testing import fake_config, fake_model
    from moestack.testing.local_api import local_stack

    real = ledger.settle_many

    def settle_many(conn, items):  # a 3-token prompt's settlement fails (a value refused)
        if any(s.record.prompt_tokens == 3 for s in items):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real(conn, items)

    monkeypatch.setattr(ledger, "settle_many", settle_many)
    config = fake_config(fake_model("fake-moe"), storage={"url": f"sqlite:///{tmp_path}/t.db"},
                         tenancy={"enabled": True, "auth_cache_ttl_s": 0})
    async with local_stack(config) as stack:
        _, key = stack.tenancy.store.create_tenant("t", max_concurrent_requests=1)
        headers = {"Authorization": f"Bearer {key.plaintext}"}
        statuses, ids = [], []
        for prompt in ("a b", "a b c", "a b"):
            r = await stack.http.post("/v1/completions", headers=headers, json={
                "model": "fake-moe", "prompt": prompt, "max_tokens": 2})
            statuses.append(r.status_code)
            ids.append(r.headers["x-moestack-request-id"])
            stack.tenancy.writer.flush()
        # Before: the second row stayed `pending` and renewed, and the third got
        # `429 limit 1, in flight 1` for as long as the gateway lived.
        assert statuses == [200, 200, 200]
        rows = {r.request_id: r for r in ledger.query_usage(stack.tenancy.store)}
        assert [rows[i].state for i in ids] == ["settled", "lost", "settled"]
        assert rows[ids[1]].error_code == "settle_failed"
        assert inflight(stack.tenancy.store, 1) == 0 and not stack.tenancy._running


def test_a_settlement_in_the_same_batch_frees_its_slot_before_the_next_admission(store):
    _, key = store.create_tenant("t", max_concurrent_requests=1)
    p = authenticate(store, key.plaintext)
    writer = StoreWriter(store, flush_interval_s=0.01)
    writer.submit(admit_op(p, "first", 10), p.tenant_id).result(timeout=10)
    writer2, release = held_writer(store)
    # The client has its answer and sends again at once: both writes meet in one batch.
    settled = writer2.submit_batched(ledger.settle_many, Settlement(record("first"), 0.0),
                                     p.tenant_id)
    second = writer2.submit(admit_op(p, "second", 10), p.tenant_id)
    release.set()
    assert settled.result(timeout=10) is True and second.exception(timeout=10) is None
    assert states(store) == {"first": "settled", "second": "pending"}
    writer.stop()
    writer2.stop()
