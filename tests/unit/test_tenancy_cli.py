"""`moestack tenants ...` and `moestack usage` against a SQLite store."""

import re

from moestack.usage import RequestRecord
from moestack.cli import main
from moestack.tenancy import ledger
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.store import TenancyStore


def run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse rejects bad arguments with exit status 2
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tenant_lifecycle_from_the_command_line(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/t.db"
    rc, out, _ = run(capsys, "tenants", "create", "acme", "--db", db, "--rpm", "5",
                     "--models", "m1,m2", "--budget-usd", "10", "--budget-period", "day")
    assert rc == 0 and "rpm=5" in out and "budget=10 USD/day" in out
    key = re.search(r"(msk-\S+)", out).group(1)
    rc, out, _ = run(capsys, "tenants", "set-limits", "acme", "--db", db, "--rpm", "none",
                     "--weight", "2.5", "--priority", "1")
    assert rc == 0 and "rpm=-" in out and "weight=2.5" in out and "priority=1" in out
    rc, out, _ = run(capsys, "tenants", "list", "--db", db)
    assert key not in out and key.split("-")[1] in out
    rc, out, _ = run(capsys, "tenants", "revoke-key", key.split("-")[1], "--db", db)
    assert rc == 0
    rc, out, _ = run(capsys, "tenants", "list", "--db", db)
    assert "keys=-" in out
    rc, _, err = run(capsys, "tenants", "create", "acme", "--db", db, "--models", "*")
    assert rc == 1 and "already exists" in err
    rc, _, err = run(capsys, "tenants", "set-limits", "nobody", "--db", db, "--rpm", "1")
    assert rc == 1 and "no tenant" in err


def test_usage_lists_rows_and_totals_of_one_tenant(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/t.db"
    store = TenancyStore.open(db)
    for name in ("a", "b"):
        _, key = store.create_tenant(name)
        p = authenticate(store, key.plaintext)
        for i in range(2):
            rid = f"{name}-{i}"
            admit(store, p, reservation=Reservation(rid, 50, 0.5), model="m", endpoint="chat",
                  stream=False, gateway_id="g", lease_s=60)
            ledger.settle(store, RequestRecord(rid, "m", "chat", False, 200, 3, 4, 0, 0.01, 0.1),
                          charged_usd=0.25, cost_usd=0.25)
    store.close()
    rc, out, _ = run(capsys, "usage", "--tenant", "a", "--since", "1h", "--db", db, "--rows")
    assert rc == 0 and "a-0" in out and "a-1" in out and "b-0" not in out
    assert re.search(r"^a\s+m\s+2\s+6\s+8\s+0\.500000$", out, re.M)
    rc, out, _ = run(capsys, "usage", "--since", "1h", "--db", db)  # totals from the rollups
    assert rc == 0 and "a-0" not in out and "rollups" in out
    assert re.search(r"^b\s+m\s+2\s+6\s+8\s+0\.500000$", out, re.M)
    rc, out, _ = run(capsys, "usage", "--since", "2999-01-01", "--db", db, "--totals")
    assert rc == 0 and not re.search(r"^a\s+m", out, re.M)
    for bad in ("yesterday", "99999999999d", "9999-12-31T23:00:00-05:00"):
        rc, _, err = run(capsys, "usage", "--since", bad, "--db", db)
        assert rc == 2 and "not a time" in err, bad


def test_limits_out_of_range_are_refused_like_the_admin_api(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/t.db"
    rc, _, err = run(capsys, "tenants", "create", "big", "--rpm", str(2**64), "--db", db)
    assert rc == 1 and "requests_per_min" in err
    rc, _, err = run(capsys, "tenants", "create", "nan", "--weight", "nan", "--db", db)
    assert rc == 1 and "weight" in err
