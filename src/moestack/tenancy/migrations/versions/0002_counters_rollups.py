"""tenant counters, rate buckets, hourly usage rollups, change version; built from the ledger

Revision ID: 0002
Revises: 0001

Existing data is kept and converted: every tenant gets its counters (in-flight rows, spend of the
current UTC day and month and ever, in nano-USD), the last two minutes of ledger rows become rate
buckets, and every ledger row is summed into the hourly rollups, exactly as admission and
settlement maintain them from now on. The ledger is read once, in pages, in primary-key order.
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NUSD = 1_000_000_000
PAGE_ROWS = 20_000
EPOCH = dt.datetime(1970, 1, 1)
SUMS = ("requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
        "charged_tokens", "charged_nusd", "cost_nusd", "unpriced_prompt_tokens",
        "unpriced_cached_prompt_tokens", "unpriced_completion_tokens")
ROLLUP_KEY = ("tenant_id", "model", "endpoint", "hour")


def _nusd(usd):
    return int(round((usd or 0.0) * NUSD))


def _create_tables() -> None:
    op.create_table(
        "tenant_counters",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("inflight", sa.Integer, nullable=False),
        sa.Column("day_start", sa.DateTime, nullable=False),
        sa.Column("day_nusd", sa.BigInteger, nullable=False),
        sa.Column("month_start", sa.DateTime, nullable=False),
        sa.Column("month_nusd", sa.BigInteger, nullable=False),
        sa.Column("total_nusd", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("second", sa.BigInteger, primary_key=True),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )
    def key():
        return [sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"),
                          primary_key=True),
                sa.Column("model", sa.String(128), primary_key=True),
                sa.Column("endpoint", sa.String(32), primary_key=True),
                sa.Column("hour", sa.DateTime, primary_key=True)]
    op.create_table("usage_rollups", *key(),
                    *[sa.Column(f, sa.BigInteger, nullable=False) for f in SUMS])
    op.create_table("usage_rollup_baselines", *key(),
                    sa.Column("baseline", sa.String(64), primary_key=True),
                    sa.Column("nusd", sa.BigInteger, nullable=False))
    op.create_table("tenancy_version",
                    sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("version", sa.BigInteger, nullable=False))
    op.create_index("ix_usage_started", "usage_ledger", ["started_at"])


def _rows(conn, ledger):
    last = None
    cols = [ledger.c[n] for n in (
        "request_id", "tenant_id", "model", "endpoint", "state", "prompt_tokens",
        "cached_prompt_tokens", "completion_tokens", "charged_tokens", "charged_usd",
        "cost_usd", "baseline_costs_usd", "started_at", "lease_expires_at")]
    while True:
        q = sa.select(*cols).order_by(ledger.c.request_id).limit(PAGE_ROWS)
        if last is not None:
            q = q.where(ledger.c.request_id > last)
        page = conn.execute(q).all()
        if not page:
            return
        yield from page
        last = page[-1].request_id


def upgrade() -> None:
    _create_tables()
    conn = op.get_bind()
    meta = sa.MetaData()
    ledger = sa.Table("usage_ledger", meta, autoload_with=conn)
    tenants = sa.Table("tenants", meta, autoload_with=conn)
    counters_t = sa.Table("tenant_counters", meta, autoload_with=conn)
    buckets_t = sa.Table("rate_buckets", meta, autoload_with=conn)
    rollups_t = sa.Table("usage_rollups", meta, autoload_with=conn)
    baselines_t = sa.Table("usage_rollup_baselines", meta, autoload_with=conn)
    version_t = sa.Table("tenancy_version", meta, autoload_with=conn)

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    window_from = int((now - EPOCH).total_seconds()) - 120
    counters = {tid: {"tenant_id": tid, "inflight": 0, "day_start": day, "day_nusd": 0,
                      "month_start": month, "month_nusd": 0, "total_nusd": 0}
                for (tid,) in conn.execute(sa.select(tenants.c.id))}
    rolls, bases, buckets = {}, {}, {}
    for r in _rows(conn, ledger):
        c = counters[r.tenant_id]
        charged = _nusd(r.charged_usd)
        if r.state == "pending":
            c["inflight"] += 1
        c["total_nusd"] += charged
        c["month_nusd"] += charged if r.started_at >= month else 0
        c["day_nusd"] += charged if r.started_at >= day else 0
        second = int((r.started_at - EPOCH) // dt.timedelta(seconds=1))
        if second > window_from:
            b = buckets.setdefault((r.tenant_id, second), [0, 0])
            b[0] += 1
            b[1] += r.charged_tokens
        key = (r.tenant_id, r.model, r.endpoint,
               r.started_at.replace(minute=0, second=0, microsecond=0))
        roll = rolls.setdefault(key, dict.fromkeys(SUMS, 0))
        roll["requests"] += 1
        for f in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens",
                  "charged_tokens"):
            roll[f] += getattr(r, f)
        roll["charged_nusd"] += charged
        roll["cost_nusd"] += _nusd(r.cost_usd)
        if r.state != "settled":
            continue
        if r.baseline_costs_usd is None:
            for f in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens"):
                roll[f"unpriced_{f}"] += getattr(r, f)
        else:
            for name, usd in r.baseline_costs_usd.items():
                bases[(*key, name)] = bases.get((*key, name), 0) + _nusd(usd)
    if counters:
        conn.execute(counters_t.insert(), list(counters.values()))
    if buckets:
        conn.execute(buckets_t.insert(), [{"tenant_id": t, "second": s, "requests": n,
                                           "tokens": tok} for (t, s), (n, tok) in buckets.items()])
    if rolls:
        conn.execute(rollups_t.insert(), [dict(zip(ROLLUP_KEY, k), **v)
                                          for k, v in rolls.items()])
    if bases:
        conn.execute(baselines_t.insert(), [dict(zip((*ROLLUP_KEY, "baseline"), k), nusd=n)
                                            for k, n in bases.items()])
    conn.execute(version_t.insert(), [{"id": 1, "version": 1}])


def downgrade() -> None:
    op.drop_index("ix_usage_started", "usage_ledger")
    for name in ("tenancy_version", "usage_rollup_baselines", "usage_rollups", "rate_buckets",
                 "tenant_counters"):
        op.drop_table(name)
