"""LoRA adapter registry; the usage ledger names a request's adapter

Revision ID: 0004_adapters
Revises: 0003

``adapters``: one row per registered adapter (name, base model, PEFT directory, content hash,
rank, owner tenant, the other tenants it is shared with, optional price). ``usage_ledger`` gets
a nullable ``adapter`` column (NULL: the base model); adding a nullable column rewrites no rows
on either dialect.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_adapters"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("owner_tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("shared_tenant_ids", sa.JSON, nullable=False),
        sa.Column("usd_per_1m_tokens", sa.Float),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_adapters_owner_tenant_id", "adapters", ["owner_tenant_id"])
    op.add_column("usage_ledger", sa.Column("adapter", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("adapter")
    op.drop_index("ix_adapters_owner_tenant_id", "adapters")
    op.drop_table("adapters")
