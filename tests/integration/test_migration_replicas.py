"""The replica-kill probe (at suite size; ``benchmarks/migration.py`` runs 100 streams): two
ModelServer replicas of tiny DeepSeek-V3 on Ray Serve, streamed chat requests through the
gateway, one replica SIGKILLed mid-load. The streams on the dead replica are resumed on the
other one: no client sees an error, the ledger holds one row per answer, and the tenant is
billed its prompt once and each of its completion tokens once."""

import pytest

from moestack.testing.migration_probe import (
    kill_probe,
    probe_stack,
    start_tenancy,
    stop_tenancy,
    unfailed_texts,
)

pytestmark = pytest.mark.integration

STREAMS, TOKENS = 48, 128  # long enough that the kill lands mid-stream on a quiet host


@pytest.fixture(scope="module")
def stack():
    with probe_stack(replicas=2) as s:
        yield s


async def test_streams_survive_a_replica_sigkill_with_no_error_and_billed_once(stack):
    await start_tenancy(stack)
    try:
        reference = await unfailed_texts(stack, TOKENS)
        assert len(stack.replica_processes()) == 2
        figures = await kill_probe(stack, STREAMS, TOKENS, reference)
    finally:
        await stop_tenancy(stack)
    print("\n".join(figures.lines()))
    assert figures.killed_pid is not None and figures.kill_error is None
    assert figures.shm_orphans_after_kill == []  # the successor removed the dead one's files
    assert figures.errors == []
    assert figures.migrated >= 1
    assert figures.ledger_rows == STREAMS
    assert (figures.ledger_prompt_tokens, figures.ledger_completion_tokens) == (
        figures.expected_prompt_tokens, figures.expected_completion_tokens)
