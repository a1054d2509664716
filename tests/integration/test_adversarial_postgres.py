"""The adversarial suite of tests/unit/test_adversarial_tenant.py and the store writer's
isolation tests on a real PostgreSQL server (32-bit INTEGER columns and aborted transactions are
where the report's failures began)."""

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moestack.testing.postgres import PostgresUnavailable, postgres_server
from tests.unit import test_tenancy_writer_isolation as isolation
from tests.unit.test_adversarial_tenant import (
    FIXED,
    Figures,
    attack_next_to_a_victim,
    attacks,
    check,
)

pytestmark = pytest.mark.integration

EXAMPLES = 3
TOTAL = Figures()
_databases = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    try:
        with postgres_server() as pg:
            yield pg
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(drawn=st.lists(attacks(), min_size=15, max_size=25))
def test_attacker_gets_only_4xx_while_the_victim_is_served_and_metered_exactly_on_postgres(
        postgres, drawn):
    url = postgres.create_database(f"adversarial_{next(_databases)}")
    figures, problems = asyncio.run(attack_next_to_a_victim(url, FIXED + drawn))
    TOTAL.add(figures)
    print(TOTAL.line("postgresql (running total)"))
    check(figures, problems)


@pytest.fixture
def pg_store(postgres):
    from moestack.tenancy.store import TenancyStore

    store = TenancyStore.open(postgres.create_database(f"writer_{next(_databases)}"))
    yield store
    store.close()


# The writer's isolation on PostgreSQL, where a refused value (DataError: bigint out of range)
# also aborts the transaction: the tests of tests/unit/test_tenancy_writer_isolation.py.

def test_one_failing_operation_fails_alone_on_postgres(pg_store):
    isolation.test_one_failing_operation_fails_alone_and_the_rest_of_its_batch_commits(pg_store)


def test_a_failing_admission_leaves_no_row_and_no_in_flight_count_on_postgres(pg_store):
    isolation.test_a_failing_admission_next_to_others_leaves_no_row_and_no_in_flight_count(
        pg_store)


def test_a_failing_settlement_is_closed_and_the_others_settle_on_postgres(pg_store):
    isolation.test_a_failing_settlement_is_closed_by_its_fallback_and_the_others_settle(pg_store)


def test_a_settlement_frees_its_slot_before_the_next_admission_on_postgres(pg_store):
    isolation.test_a_settlement_in_the_same_batch_frees_its_slot_before_the_next_admission(
        pg_store)
