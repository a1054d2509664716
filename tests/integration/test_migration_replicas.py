"""The migration probe: ``benchmarks/migration.py`` at suite size (its smoke run, with the kill
at probe size). Two ModelServer replicas of tiny DeepSeek-V3 on Ray Serve, streamed chat
requests through the gateway:

- one replica SIGKILLed mid-load: the streams on the dead replica are resumed on the other one,
  no client sees an error, the ledger holds one row per answer, and the tenant is billed its
  prompt once and each completion token once;
- a scale-down from 2 replicas to 1 under long streams: the draining replica's streams go on on
  the live one (``gateway.migration.drain_after_s``), with no error and billed once;
- a rolling update under load: no error;
- nothing of the stack's left in /dev/shm after the kill and the stop."""

import re

import pytest

from tests.integration.test_benchmarks_smoke import FIGURES
from tests.unit.test_benchmarks_smoke import NUM, assert_figures, run_benchmark

pytestmark = pytest.mark.integration

STREAMS, TOKENS = 24, 64  # the kill lands at the first streamed text, mid-stream
DRAIN_STREAMS = 4  # the smoke size: two on each replica


def test_streams_survive_a_replica_kill_a_scale_down_and_a_rolling_update_billed_once():
    out = run_benchmark("migration.py", "--requests", str(STREAMS), "--tokens", str(TOKENS),
                        "--drain-streams", str(DRAIN_STREAMS), "--drain-after-s", "0.5",
                        timeout_s=1200)
    print(out)
    assert_figures("migration.py", out, FIGURES["migration.py"])
    assert_figures("migration.py", out, [
        rf"^streams {STREAMS}, client-visible errors 0$",
        rf"^ledger rows {STREAMS} for {STREAMS} answers; tenant tokens prompt (\d+) "
        rf"\(expected \1\), completion {STREAMS * TOKENS} \(expected {STREAMS * TOKENS}\)$",
        rf"^killed replica pid \d+ at {NUM} s of the load$",
        rf"^the killed replica's successor ran {NUM} s after the kill$",
        r"^/dev/shm files of the stack left unused after the kill: 0$",
        rf"^ledger rows {DRAIN_STREAMS} for {DRAIN_STREAMS} answers; tenant tokens \(prompt, "
        r"completion\) \((\d+), (\d+)\), expected \(\1, \2\)$",
        rf"^rolling update took {NUM} s; streams \d+, client-visible errors 0,",
        r"^/dev/shm files of the stack left after the stop: 0$"])
    migrated = int(re.search(r"^requests migrated (\d+);", out, re.MULTILINE).group(1))
    assert migrated >= 1
    drain = re.search(r"^scale-down 2 -> 1 under .*: the draining replica had no request "
                      r"under way .* and stopped .*; client-visible errors (\d+); streams moved "
                      r"(\d+)$", out, re.MULTILINE)
    assert drain is not None, out[-3000:]
    assert int(drain.group(1)) == 0 and int(drain.group(2)) >= 1
