"""Migration 0003 (64-bit token columns) on a real PostgreSQL server, from a store at 0002
holding rows (the SQLite run of the same scenario is in tests/unit)."""

import pytest

from moestack.testing.postgres import PostgresUnavailable, postgres_server
from tests.unit.test_tenancy_migration import upgrade_from_0002_keeps_rows_and_takes_64_bit_counts

pytestmark = pytest.mark.integration


def test_postgres_store_at_0002_with_rows_upgrades_to_64_bit_token_counts():
    try:
        with postgres_server() as pg:  # a short socket path (tmp_path may be too long)
            figures = upgrade_from_0002_keeps_rows_and_takes_64_bit_counts(
                pg.create_database("migrate"))
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    assert figures == {"rows": 6, "indexes": 4}
