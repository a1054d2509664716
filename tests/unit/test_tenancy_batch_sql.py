"""The request path's driver-level statements (``batch_sql``) on SQLite: times written exactly as
SQLAlchemy writes them, list parameters, and writes shared between batch functions sent before the
next read and at the end of the block. (PostgreSQL: tests/integration/test_tenancy_store.py.)"""

from __future__ import annotations

import datetime as dt

import pytest

from moestack.tenancy import counters
from moestack.tenancy.batch_sql import Statements, sharing
from moestack.tenancy.store import TenancyStore, sql


@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


SET_DAY = "UPDATE tenant_counters SET day_start = :day WHERE tenant_id = :t"


@pytest.mark.parametrize("day", [dt.datetime(2026, 3, 1), dt.datetime(2026, 3, 1, 12, 0, 5, 7)])
def test_times_written_to_sqlite_compare_equal_to_sqlalchemys(store, day):
    store.create_tenant("t")
    with store.begin() as conn:
        tenant_id = conn.exec_driver_sql("SELECT max(tenant_id) FROM tenant_counters").scalar()
        db = Statements(conn)
        db.write(SET_DAY, [{"day": db.time(day), "t": tenant_id}])
        db.flush()
        # SQLAlchemy's own typed comparison finds the row: the text forms are identical.
        found = conn.execute(sql("SELECT count(*) FROM tenant_counters WHERE day_start = :d",
                                 times=("d",)), {"d": day}).scalar()
        assert found == 1
        assert counters.lock(conn, tenant_id).day_start == day


def test_list_parameters_expand_and_times_read_back_as_datetimes(store):
    for i in range(3):
        store.create_tenant(f"t{i}")
    with store.begin() as conn:
        wanted = [r[0] for r in conn.exec_driver_sql("SELECT tenant_id FROM tenant_counters")]
        db = Statements(conn)
        rows = db.read("SELECT tenant_id, day_start FROM tenant_counters WHERE tenant_id IN :ids "
                       "ORDER BY tenant_id", {"ids": wanted[:2]}, ("ids",))
    assert [r[0] for r in rows] == sorted(wanted)[:2]
    assert all(isinstance(db.read_time(r[1]), dt.datetime) for r in rows)


def test_shared_writes_go_before_the_next_read_and_at_the_end_of_the_block(store):
    store.create_tenant("t")
    day = dt.datetime(2026, 5, 1)
    with store.begin() as conn:
        tenant_id = conn.exec_driver_sql("SELECT tenant_id FROM tenant_counters").scalar()
        with sharing(conn) as shared:
            db = Statements.of(conn)
            assert db is shared
            db.write(SET_DAY, [{"day": db.time(day), "t": tenant_id}])
            db.done()  # shared: not sent yet
            assert counters.lock(conn, tenant_id).day_start != day
            (row,) = Statements.of(conn).read(
                "SELECT day_start FROM tenant_counters WHERE tenant_id = :t", {"t": tenant_id})
            assert db.read_time(row[0]) == day  # the queued write went first
            db.write(SET_DAY, [{"day": db.time(day + dt.timedelta(days=1)), "t": tenant_id}])
        assert counters.lock(conn, tenant_id).day_start == day + dt.timedelta(days=1)
        alone = Statements.of(conn)
        assert alone is not shared
        alone.write(SET_DAY, [{"day": alone.time(day), "t": tenant_id}])
        alone.done()  # not shared: sent at once
        assert counters.lock(conn, tenant_id).day_start == day
