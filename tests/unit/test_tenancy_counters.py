"""Counters, window buckets and rollups equal what the raw ledger says, on a real SQLite file."""

import datetime as dt
import random

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text

from moestack.errors import RateLimitError
from moestack.tenancy import ledger, rollups
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.counters import epoch_second
from moestack.tenancy.store import TenancyStore, period_start
from moestack.tenancy.tables import utcnow
from moestack.usage import RequestRecord, to_nusd


@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


def record(request_id, prompt=3, completion=5, status=200):
    return RequestRecord(request_id=request_id, model="m", endpoint="chat.completions",
                         stream=True, status_code=status, prompt_tokens=prompt,
                         completion_tokens=completion, cached_prompt_tokens=1, ttft_s=0.01,
                         e2e_s=0.1)


def go(store, p, rid, tokens=50, usd=0.01, model="m", **kw):
    return admit(store, p, reservation=Reservation(rid, tokens, usd), model=model,
                 endpoint="chat.completions", stream=True, gateway_id=kw.pop("gw", "g"),
                 lease_s=kw.pop("lease_s", 60), **kw)


def expected_counters(store, tenant, now):
    """What the old sliding-window queries over the ledger would find."""
    rows = ledger.query_usage(store, tenant=tenant)
    day, month = period_start("day", now), period_start("month", now)
    buckets = {}
    for r in rows:
        if epoch_second(r.started_at) > epoch_second(now) - 120:
            b = buckets.setdefault(epoch_second(r.started_at), [0, 0])
            b[0] += 1
            b[1] += r.charged_tokens
    return {"inflight": sum(r.state == "pending" for r in rows),
            "day_nusd": sum(to_nusd(r.charged_usd) for r in rows if r.started_at >= day),
            "month_nusd": sum(to_nusd(r.charged_usd) for r in rows if r.started_at >= month),
            "total_nusd": sum(to_nusd(r.charged_usd) for r in rows),
            "buckets": {s: tuple(v) for s, v in buckets.items()}}


def actual_counters(store, tenant_id, now=None):
    """The counters, with the buckets a window ending within two minutes of ``now`` can see."""
    after = epoch_second(now or utcnow()) - 120
    with store.read() as conn:
        c = conn.execute(text("SELECT inflight, day_nusd, month_nusd, total_nusd FROM "
                              "tenant_counters WHERE tenant_id = :t"), {"t": tenant_id}).one()
        b = conn.execute(text("SELECT second, requests, tokens FROM rate_buckets WHERE "
                              "tenant_id = :t AND second > :after"),
                         {"t": tenant_id, "after": after}).all()
    return {"inflight": c[0], "day_nusd": c[1], "month_nusd": c[2], "total_nusd": c[3],
            "buckets": {s: (n, tok) for s, n, tok in b}}


def test_counters_and_rollups_equal_the_ledger_after_settles_losses_and_late_settles(store):
    rng = random.Random(7)
    _, key = store.create_tenant("t")
    p = authenticate(store, key.plaintext)
    now = utcnow()
    open_ids, lost_ids = [], []
    for i in range(300):
        op = rng.random()
        if op < 0.5 or not open_ids:
            when = now - dt.timedelta(days=rng.choice([0, 0, 0, 1, 40]), seconds=rng.random())
            go(store, p, f"r{i}", tokens=rng.randint(10, 90), usd=rng.random() / 7,
               model=rng.choice(["m", "n"]), now=when, lease_s=rng.choice([60, -1]))
            open_ids.append(f"r{i}")
        elif op < 0.8:
            rid = open_ids.pop(rng.randrange(len(open_ids)))
            prices = rng.choice([None, {"gpt": rng.random() / 3, "claude": 0.25}])
            ledger.settle(store, record(rid, rng.randint(0, 9), rng.randint(0, 9)),
                          charged_usd=rng.random() / 9, cost_usd=rng.random() / 11,
                          baseline_costs_usd=prices)
        elif op < 0.9:
            with store.begin() as conn:  # leases of -1 s: their gateway is "dead"
                ledger.close_lost(conn)
            lost_ids = [r.request_id for r in ledger.query_usage(store) if r.state == "lost"]
        elif lost_ids:  # a late settle of a lost row corrects the row and the counters
            ledger.settle(store, record(lost_ids.pop(), 2, 2), charged_usd=0.001)
        if i % 50 == 49:
            assert actual_counters(store, p.tenant_id, now) == expected_counters(store, "t", now)
    assert actual_counters(store, p.tenant_id, now) == expected_counters(store, "t", now)
    raw = ledger.query_usage(store)
    assert rollups.query(store) == rollups.aggregate(raw)
    assert sum(r.requests for r in rollups.query(store)) == len(raw) > 100


def test_settle_twice_changes_nothing(store):
    _, key = store.create_tenant("t")
    p = authenticate(store, key.plaintext)
    go(store, p, "r1", tokens=90, usd=0.5)
    assert ledger.settle(store, record("r1"), charged_usd=0.01)
    before = actual_counters(store, p.tenant_id), rollups.query(store)
    assert not ledger.settle(store, record("r1", completion=50), charged_usd=9.0)
    assert (actual_counters(store, p.tenant_id), rollups.query(store)) == before
    assert before[0]["total_nusd"] == to_nusd(0.01) and before[0]["inflight"] == 0


def test_requests_per_minute_admits_exactly_its_limit(store):
    _, key = store.create_tenant("t", requests_per_min=7)
    p = authenticate(store, key.plaintext)
    outcomes = []
    for i in range(20):
        try:
            go(store, p, f"r{i}")
            outcomes.append("ok")
        except RateLimitError as exc:
            outcomes.append(exc.headers()["Retry-After"])
    assert outcomes.count("ok") == 7
    assert all(1 <= int(o) <= 60 for o in outcomes if o != "ok")


def test_admission_and_settle_never_read_the_ledger(store):
    """Nothing on the request path grows with the ledger: the only statements that touch
    ``usage_ledger`` address rows by primary key (or insert one)."""
    _, key = store.create_tenant("t", requests_per_min=100, tokens_per_min=10**6,
                                 max_concurrent_requests=10, budget_usd=100.0)
    p = authenticate(store, key.plaintext)
    seen = []
    # Every statement SQLite runs, including those sent on the sqlite3 cursor itself.
    event.listen(store.engine, "checkout", lambda dbapi_conn, *a: dbapi_conn.set_trace_callback(
        lambda statement: seen.append(" ".join(statement.split()))))
    go(store, p, "r1")
    ledger.settle(store, record("r1"), charged_usd=0.001)
    on_ledger = [s for s in seen if "usage_ledger" in s]
    assert on_ledger and all(s.startswith("INSERT INTO usage_ledger") or
                             "WHERE request_id IN (" in s or
                             "WHERE request_id = " in s for s in on_ledger), on_ledger
    assert not any("sum(" in s.lower() or "count(" in s.lower() for s in seen)


def test_retention_purges_old_raw_rows_and_the_rollups_keep_them(store):
    _, key = store.create_tenant("t")
    p = authenticate(store, key.plaintext)
    old = utcnow() - dt.timedelta(days=10)
    go(store, p, "old", now=old)
    ledger.settle(store, record("old"), charged_usd=0.25)
    go(store, p, "new")
    before = rollups.query(store)
    with store.begin() as conn:
        assert ledger.purge_raw(conn, retention_days=7) == 1
    assert [r.request_id for r in ledger.query_usage(store)] == ["new"]
    assert rollups.query(store) == before
    assert sum(r.charged_nusd for r in before) == to_nusd(0.25) + to_nusd(0.01)


def make_v1_database(url):
    """A database at revision 0001 (the schema before counters) with ledger rows in it."""
    store = TenancyStore(url)
    cfg = Config()
    cfg.set_main_option("script_location", "moestack.tenancy:migrations")
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    now = utcnow()
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, allowed_models, priority, weight, "
                          "budget_period, created_at, budget_usd) VALUES ('a', '[\"*\"]', 0, "
                          "1.0, 'month', :now, 1000.0), ('b', '[\"*\"]', 0, 1.0, 'day', :now, "
                          "NULL)"), {"now": now})
        rows = []
        for i in range(40):
            state = ("settled", "pending", "lost")[i % 3]
            started = now - dt.timedelta(days=(0, 1, 35)[i % 3 if i % 4 else 0], seconds=i)
            rows.append({
                "id": f"r{i}", "t": 1 + i % 2, "state": state, "p": i, "c": 2 * i,
                "ch_t": 3 * i, "ch_u": i / 7, "cost": i / 13 if state == "settled" else None,
                "base": '{"gpt": %f}' % (i / 3) if state == "settled" and i % 5 else None,
                "started": started, "lease": now + dt.timedelta(seconds=60)})
        conn.execute(text(
            "INSERT INTO usage_ledger (request_id, tenant_id, model, endpoint, stream, state, "
            "prompt_tokens, cached_prompt_tokens, completion_tokens, reserved_tokens, "
            "reserved_usd, charged_tokens, charged_usd, cost_usd, baseline_costs_usd, "
            "started_at, gateway_id, lease_expires_at) VALUES (:id, :t, 'm', "
            "'chat.completions', true, :state, :p, 0, :c, :ch_t, :ch_u, :ch_t, :ch_u, :cost, "
            ":base, :started, 'gw', :lease)"), rows)
    store.close()
    return now


def check_migrated(url):
    store = TenancyStore.open(url)
    try:
        raw = ledger.query_usage(store)
        assert len(raw) == 40
        assert rollups.query(store) == rollups.aggregate(raw)
        now = utcnow()
        for name, tid in (("a", 1), ("b", 2)):
            got, want = actual_counters(store, tid, now), expected_counters(store, name, now)
            assert got == want, name
        # The converted store admits and settles as usual, and keeps everything exact.
        p = authenticate(store, store.create_key("a").plaintext)
        go(store, p, "after", usd=0.001)
        ledger.settle(store, record("after"), charged_usd=0.0005)
        assert rollups.query(store) == rollups.aggregate(ledger.query_usage(store))
    finally:
        store.close()


def test_migration_from_0001_builds_counters_and_rollups_from_existing_rows(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    make_v1_database(url)
    check_migrated(url)
