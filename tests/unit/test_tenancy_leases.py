"""Leases of in-flight ledger rows: a dead gateway's rows close as `lost` within
``tenancy.lease_s``, whoever sweeps (another gateway's beat or the sweeper of `moestack up`), and
the tenant's in-flight slots come back with them. Real SQLite file."""

import time

import pytest
from sqlalchemy import text

from moestack.tenancy import ledger
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.leases import (
    LeaseSweeper,
    beat_interval_s,
    close_expired,
    row_lease_s,
)
from moestack.tenancy.store import TenancyStore


@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


def admit_as(store, principal, request_id, gateway_id, lease_s):
    admit(store, principal, reservation=Reservation(request_id, 40, 0.0), model="m",
          endpoint="chat.completions", stream=True, gateway_id=gateway_id,
          lease_s=row_lease_s(lease_s))


def states(store) -> dict[str, str]:
    return {r.request_id: r.state for r in ledger.query_usage(store)}


def inflight(store, tenant_id) -> int:
    with store.read() as conn:
        return conn.execute(text("SELECT inflight FROM tenant_counters WHERE tenant_id = :t"),
                            {"t": tenant_id}).scalar_one()


def test_a_dead_gateway_row_expires_and_is_swept_within_lease_s():
    for lease_s in (0.6, 3.0, 60.0):
        # The row expires at most row_lease_s after the last renewal, and the next sweep comes
        # at most one beat later: within lease_s of the death.
        assert row_lease_s(lease_s) + beat_interval_s(lease_s) < lease_s
        # A renewal may be late by half of lease_s before a live row expires.
        assert row_lease_s(lease_s) - beat_interval_s(lease_s) == pytest.approx(lease_s / 2)


def test_sweep_closes_expired_rows_of_every_gateway_and_frees_their_in_flight_slots(store):
    _, key = store.create_tenant("t", max_concurrent_requests=3)
    p = authenticate(store, key.plaintext)
    admit_as(store, p, "dead-1", "host-101-aaaa", lease_s=0.3)
    admit_as(store, p, "dead-2", "host-102-bbbb", lease_s=0.3)
    admit_as(store, p, "live", "host-103-cccc", lease_s=60)
    assert inflight(store, p.tenant_id) == 3
    assert close_expired(store) == 0  # nothing expired yet
    time.sleep(row_lease_s(0.3) + 0.05)
    assert close_expired(store) == 2
    assert states(store) == {"dead-1": "lost", "dead-2": "lost", "live": "pending"}
    assert inflight(store, p.tenant_id) == 1
    admit_as(store, p, "after", "host-103-cccc", lease_s=60)  # a freed slot admits again


def test_sweeper_thread_closes_rows_while_no_gateway_runs(store):
    lease_s = 0.6
    _, key = store.create_tenant("t", max_concurrent_requests=2)
    p = authenticate(store, key.plaintext)
    admit_as(store, p, "a", "host-7-dead", lease_s)
    admit_as(store, p, "b", "host-7-dead", lease_s)
    sweeper = LeaseSweeper(store, lease_s)
    killed = time.monotonic()
    sweeper.start()
    try:
        while any(s == "pending" for s in states(store).values()):
            assert time.monotonic() - killed < 10 * lease_s, "the sweeper closed nothing"
            time.sleep(0.02)
        closed_after = time.monotonic() - killed
    finally:
        sweeper.stop()
    assert states(store) == {"a": "lost", "b": "lost"} and sweeper.closed == 2
    assert inflight(store, p.tenant_id) == 0
    print(f"rows of a dead gateway closed {closed_after:.2f} s after it died (lease_s "
          f"{lease_s:g} s)")


def test_sweeper_keeps_sweeping_through_store_errors_and_stops_at_once(tmp_path):
    store = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    sweeper = LeaseSweeper(store, lease_s=0.3)
    sweeper.start()
    try:
        (tmp_path / "t.db").unlink()  # the ledger is gone: every sweep now fails
        time.sleep(0.3)  # several beats
        assert sweeper._thread.is_alive()
        started = time.monotonic()
    finally:
        sweeper.stop()
        store.close()
    assert time.monotonic() - started < 1.0
