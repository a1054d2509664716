"""Migration 0004_adapters on a SQLite store at 0003 holding a ledger row: the adapter registry
and the ledger's ``adapter`` column come and go, the row stays as it was."""

from sqlalchemy import inspect, text

from moestack.tenancy.store import TenancyStore

from tests.unit.test_tenancy_migration import migrate

ROW = ("r1", 1, "m", "completions", 0, "settled", 3, 4, 7, 0.5, 7, 0.5, "2026-12-01 10:00:00",
       "gw", 1)


def _ledger(url):
    store = TenancyStore(url)
    with store.read() as conn:
        rows = conn.execute(text("SELECT request_id, tenant_id, model, endpoint, stream, state, "
                                 "prompt_tokens, completion_tokens, reserved_tokens, "
                                 "reserved_usd, charged_tokens, charged_usd, started_at, "
                                 "gateway_id, cached_prompt_tokens FROM usage_ledger")).all()
    insp = inspect(store.engine)
    out = ([tuple(r) for r in rows], set(insp.get_table_names()),
           {c["name"] for c in insp.get_columns("usage_ledger")})
    store.close()
    return out


def test_0004_adds_the_registry_and_ledger_adapter_column_and_downgrades(tmp_path):
    url = f"sqlite:///{tmp_path}/m.db"
    migrate(url, "0003")
    store = TenancyStore(url)
    with store.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, allowed_models, priority, weight, "
                          "budget_period, created_at) VALUES (1, 'a', '[\"*\"]', 0, 1.0, "
                          "'month', '2026-12-01 00:00:00')"))
        conn.execute(text("INSERT INTO usage_ledger (request_id, tenant_id, model, endpoint, "
                          "stream, state, prompt_tokens, completion_tokens, reserved_tokens, "
                          "reserved_usd, charged_tokens, charged_usd, started_at, gateway_id, "
                          "cached_prompt_tokens) VALUES (:a, :b, :c, :d, :e, :f, :g, :h, :i, "
                          ":j, :k, :l, :m, :n, :o)"), dict(zip("abcdefghijklmno", ROW)))
    store.close()
    before, tables, columns = _ledger(url)
    assert "adapters" not in tables and "adapter" not in columns
    migrate(url, "0004_adapters")
    after, tables, columns = _ledger(url)
    assert after == before and "adapters" in tables and "adapter" in columns
    migrate(url, "0003", down=True)
    down, tables, columns = _ledger(url)
    assert down == before and "adapters" not in tables and "adapter" not in columns
