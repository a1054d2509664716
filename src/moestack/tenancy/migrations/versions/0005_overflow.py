"""overflow to external providers: tenant policy, ledger backend, overflow counters

Revision ID: 0005_overflow
Revises: 0004_adapters

Adds the tenant's overflow policy (``never`` by default: data leaves the house only for tenants
that opt in) and monthly overflow budget, the ledger row's ``backend`` (``replica`` for every
existing row, or ``provider:<name>``), and ``overflow_counters`` (what a tenant's overflowed
requests cost at the providers this UTC month). Columns with server defaults: existing rows keep
their meaning and no table is rewritten on PostgreSQL.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_overflow"
down_revision = "0004_adapters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite 3.35+ and PostgreSQL): no table is copied, and the tenants
    # table, which the ledger references, is never recreated.
    op.add_column("tenants", sa.Column("overflow_policy", sa.String(16), nullable=False,
                                       server_default="never"))
    op.add_column("tenants", sa.Column("overflow_budget_usd", sa.Float, nullable=True))
    op.add_column("usage_ledger", sa.Column("backend", sa.String(64), nullable=False,
                                            server_default="replica"))
    op.create_table(
        "overflow_counters",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("month_start", sa.DateTime, nullable=False),
        sa.Column("month_nusd", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("overflow_counters")
    op.drop_column("usage_ledger", "backend")
    op.drop_column("tenants", "overflow_budget_usd")
    op.drop_column("tenants", "overflow_policy")
