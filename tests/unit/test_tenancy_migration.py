"""Migration 0003 (64-bit token columns) from a store at 0002 holding rows: SQLite here, a real
PostgreSQL in tests/integration/test_tenancy_migration_postgres.py (same scenario)."""

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.exc import DataError

from moestack.tenancy import ledger
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.store import TenancyStore
from moestack.usage import RequestRecord

TOKEN_COLUMNS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reserved_tokens",
                 "charged_tokens")
BIG = 3 * 2**31  # past a 32-bit INTEGER


def migrate(url: str, revision: str, down: bool = False) -> None:
    store = TenancyStore(url)
    cfg = Config()
    cfg.set_main_option("script_location", "moestack.tenancy:migrations")
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
    store.close()


TABLES = ("tenants", "api_keys", "usage_ledger", "tenant_counters", "usage_rollups")
"""The tables a store at 0002 holds rows in; snapshots read them with plain SQL, as 0002 has
them, since the ORM speaks the head revision."""


def snapshot(store: TenancyStore, columns: dict[str, list[str]] | None = None) -> dict:
    """The rows of :data:`TABLES` (only ``columns`` per table, if given: those of an older
    revision), the revision, and ``usage_ledger``'s indexes, foreign keys and token types."""
    insp = inspect(store.engine)
    columns = columns or {t: sorted(c["name"] for c in insp.get_columns(t)) for t in TABLES}
    rows = {}
    with store.read() as conn:
        for table, names in columns.items():
            listed = ", ".join(names)
            rows[table] = sorted((tuple(r) for r in conn.execute(
                text(f"SELECT {listed} FROM {table}"))), key=repr)
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return {"rows": rows, "columns": columns, "version": version,
            "indexes": sorted((i["name"], tuple(i["column_names"]))
                              for i in insp.get_indexes("usage_ledger")),
            "foreign_keys": [(f["referred_table"], tuple(f["constrained_columns"]))
                             for f in insp.get_foreign_keys("usage_ledger")],
            "types": {c["name"]: type(c["type"]).__name__.upper()
                      for c in insp.get_columns("usage_ledger") if c["name"] in TOKEN_COLUMNS}}


def admit_and_settle(store, principal, request_id, tokens, prompt=3, completion=4, settle=True):
    admit(store, principal, reservation=Reservation(request_id, tokens, tokens * 1e-9),
          model="m", endpoint="completions", stream=False, gateway_id="gw", lease_s=60)
    if settle:
        ledger.settle(store, RequestRecord(request_id, "m", "completions", False, 200, prompt,
                                           completion, 1, 0.01, 0.02), charged_usd=1e-6,
                      cost_usd=2e-6, baseline_costs_usd={"gpt": 3e-6})


def upgrade_from_0002_keeps_rows_and_takes_64_bit_counts(url: str) -> dict:
    """The scenario on any store URL; returns the figures it checked. The rows are written at
    the head revision (the ORM's) and the store taken down to 0002 with them, so the scenario
    keeps working as later revisions add columns."""
    store = TenancyStore.open(url)
    _, key_a = store.create_tenant("a", max_concurrent_requests=10)
    _, key_b = store.create_tenant("b")
    a, b = authenticate(store, key_a.plaintext), authenticate(store, key_b.plaintext)
    for i in range(5):
        admit_and_settle(store, a, f"a{i}", 100 + i)
    admit_and_settle(store, b, "b-pending", 70, settle=False)
    store.close()
    migrate(url, "0002", down=True)
    store = TenancyStore(url)
    if store.dialect == "postgresql":  # the bug: a 32-bit column cannot take the reservation
        try:
            with store.begin() as conn:
                conn.execute(text("UPDATE usage_ledger SET reserved_tokens = :big "
                                  "WHERE request_id = 'b-pending'"), {"big": BIG})
            raise AssertionError("PostgreSQL took a 64-bit value into an INTEGER column")
        except DataError:
            pass
    before = snapshot(store)
    store.close()
    assert before["version"] == "0002" and set(before["types"].values()) == {"INTEGER"}

    migrate(url, "0003")
    store = TenancyStore(url)
    after = snapshot(store, before["columns"])
    assert after["version"] == "0003"
    assert set(after["types"].values()) == {"BIGINT"}, after["types"]
    for part in ("rows", "indexes", "foreign_keys"):
        assert after[part] == before[part], part
    store.close()
    store = TenancyStore.open(url)  # on to head, as a gateway does at start
    admit_and_settle(store, b, "b-big", BIG, prompt=BIG - 10, completion=5)
    [big] = [r for r in ledger.query_usage(store) if r.request_id == "b-big"]
    assert (big.prompt_tokens, big.charged_tokens, big.state) == (BIG - 10, BIG - 5, "settled")
    assert snapshot(store, before["columns"])["rows"]["tenants"] == before["rows"]["tenants"]
    store.close()

    # Back down works while every count fits 32 bits again.
    with TenancyStore(url).begin() as conn:
        conn.execute(text("DELETE FROM usage_ledger WHERE request_id = 'b-big'"))
    migrate(url, "0002", down=True)
    store = TenancyStore(url)
    down = snapshot(store, before["columns"])
    assert down["version"] == "0002" and set(down["types"].values()) == {"INTEGER"}
    assert down["rows"]["usage_ledger"] == before["rows"]["usage_ledger"]
    assert down["indexes"] == before["indexes"]
    store.close()
    return {"rows": len(before["rows"]["usage_ledger"]), "indexes": len(before["indexes"])}


def test_sqlite_store_at_0002_with_rows_upgrades_to_64_bit_token_counts(tmp_path):
    figures = upgrade_from_0002_keeps_rows_and_takes_64_bit_counts(
        f"sqlite:///{tmp_path}/ledger.db")
    assert figures == {"rows": 6, "indexes": 4}
