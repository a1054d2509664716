"""usage ledger token counts as 64-bit integers

Revision ID: 0003
Revises: 0002

``reserved_tokens`` is prompts x ``n`` x completion budget, so a 32-bit INTEGER (PostgreSQL's
``integer``) could not hold what one request may reserve, and the real counts of a large request
come close. The token columns become BIGINT; the values are kept as they are.

PostgreSQL: one ``ALTER TABLE`` changing every column, so the table is rewritten once (it holds
an exclusive lock on the ledger meanwhile: on a large ledger, run it in a quiet hour). SQLite
already stores 64-bit integers whatever the declared type; batch mode recreates the table with the
new declared types (copying the rows, keeping the indexes).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TOKEN_COLUMNS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reserved_tokens",
                 "charged_tokens")


def _retype(new: type, old: type) -> None:
    if op.get_bind().dialect.name == "postgresql":
        using = "::bigint" if new is sa.BigInteger else "::integer"
        kind = "BIGINT" if new is sa.BigInteger else "INTEGER"
        op.execute("ALTER TABLE usage_ledger " + ", ".join(
            f"ALTER COLUMN {c} TYPE {kind} USING {c}{using}" for c in TOKEN_COLUMNS))
        return
    with op.batch_alter_table("usage_ledger") as batch:
        for c in TOKEN_COLUMNS:
            batch.alter_column(c, type_=new(), existing_type=old(), existing_nullable=False)


def upgrade() -> None:
    _retype(sa.BigInteger, sa.Integer)


def downgrade() -> None:
    # Fails (PostgreSQL: integer out of range) if a row holds a count past 2^31 - 1.
    _retype(sa.Integer, sa.BigInteger)
