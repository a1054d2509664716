"""tenants, api keys, usage ledger

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("allowed_models", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("weight", sa.Float, nullable=False),
        sa.Column("requests_per_min", sa.Integer),
        sa.Column("tokens_per_min", sa.Integer),
        sa.Column("max_concurrent_requests", sa.Integer),
        sa.Column("budget_usd", sa.Float),
        sa.Column("budget_period", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("revoked_at", sa.DateTime),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "usage_ledger",
        sa.Column("request_id", sa.String(96), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error_code", sa.String(64)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("cached_prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("reserved_tokens", sa.Integer, nullable=False),
        sa.Column("reserved_usd", sa.Float, nullable=False),
        sa.Column("charged_tokens", sa.Integer, nullable=False),
        sa.Column("charged_usd", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float),
        sa.Column("baseline_costs_usd", sa.JSON),
        sa.Column("ttft_s", sa.Float),
        sa.Column("e2e_s", sa.Float),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("gateway_id", sa.String(64), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime),
    )
    op.create_index("ix_usage_tenant_started", "usage_ledger", ["tenant_id", "started_at"])
    op.create_index("ix_usage_state_lease", "usage_ledger", ["state", "lease_expires_at"])
    op.create_index("ix_usage_gateway_state", "usage_ledger", ["gateway_id", "state"])


def downgrade() -> None:
    op.drop_table("usage_ledger")
    op.drop_table("api_keys")
    op.drop_table("tenants")
