"""Admissions batched in one transaction (``admit_many``, as the store writer runs them): each is
checked against the counters as the ones before it in the batch left them, a refused one writes
nothing, and the counters and rollups still equal the ledger."""

from __future__ import annotations

import pytest

from moestack.errors import InsufficientQuotaError, InvalidRequestError, RateLimitError
from moestack.tenancy import ledger, rollups
from moestack.tenancy.admission import Admission, Reservation, admit_many, authenticate
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.tables import utcnow

from tests.unit.test_tenancy_counters import actual_counters, expected_counters, record


@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


def batch(p, ids, tokens=10, usd=0.01):
    return [Admission(p, Reservation(rid, tokens, usd), "m", "chat.completions", True, "g", 60)
            for rid in ids]


def test_a_batch_admits_exactly_what_the_budget_and_rpm_allow_in_arrival_order(store):
    _, budget_key = store.create_tenant("budget", budget_usd=0.05)
    _, rpm_key = store.create_tenant("rpm", requests_per_min=3)
    pb = authenticate(store, budget_key.plaintext)
    pr = authenticate(store, rpm_key.plaintext)
    items = [a for pair in zip(batch(pb, [f"b{i}" for i in range(8)]),
                               batch(pr, [f"r{i}" for i in range(8)])) for a in pair]
    with store.begin() as conn:
        results = admit_many(conn, items)
    budget = [r for a, r in zip(items, results) if a.principal is pb]
    rpm = [r for a, r in zip(items, results) if a.principal is pr]
    assert [isinstance(r, InsufficientQuotaError) for r in budget] == [False] * 5 + [True] * 3
    assert budget[:5] == pytest.approx([0.04, 0.03, 0.02, 0.01, 0.0])
    assert [isinstance(r, RateLimitError) for r in rpm] == [False] * 3 + [True] * 5
    assert [e.request_id for e in ledger.query_usage(store, tenant="budget")] == [
        f"b{i}" for i in range(5)]
    assert len(ledger.query_usage(store, tenant="rpm")) == 3
    now = utcnow()
    for name, p in (("budget", pb), ("rpm", pr)):
        assert actual_counters(store, p.tenant_id, now) == expected_counters(store, name, now)
    assert rollups.query(store) == rollups.aggregate(ledger.query_usage(store))


def test_a_request_id_used_before_or_earlier_in_the_batch_is_refused_alone(store):
    _, key = store.create_tenant("t", max_concurrent_requests=10)
    p = authenticate(store, key.plaintext)
    with store.begin() as conn:
        assert admit_many(conn, batch(p, ["a"])) == [None]
    with store.begin() as conn:
        results = admit_many(conn, batch(p, ["a", "b", "b", "c"]))
    assert [type(r).__name__ for r in results] == [
        "InvalidRequestError", "NoneType", "InvalidRequestError", "NoneType"]
    assert all(r.code == "duplicate_request_id" for r in results
               if isinstance(r, InvalidRequestError))
    assert sorted(e.request_id for e in ledger.query_usage(store)) == ["a", "b", "c"]
    ledger.settle(store, record("b"), charged_usd=0.001)
    now = utcnow()
    assert actual_counters(store, p.tenant_id, now) == expected_counters(store, "t", now)
    assert actual_counters(store, p.tenant_id, now)["inflight"] == 2
