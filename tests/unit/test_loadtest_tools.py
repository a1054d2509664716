"""Helpers of the benchmarks and the reliability suite: usage reconciliation, CPU accounting."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from moestack.loadtest.abuse import UsageRecorder
from moestack.loadtest.compare import TargetRun, process_tree_cpu_s, table


def test_reconcile_counts_requests_without_record_and_ids_recorded_twice():
    rec = UsageRecorder()
    for rid in ("a", "b", "b", "c"):
        rec.record(SimpleNamespace(request_id=rid))
    check = rec.reconcile(["a", "b", "x", "y"])
    assert (check.requests, check.lost, check.double_billed) == (4, 2, 1)


def test_process_tree_cpu_counts_children_of_the_given_process():
    # The child burns ~0.3 s of CPU in a grandchild, then both wait to be measured.
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time\\nt=time.process_time()\\nwhile time.process_time()-t<0.3: pass\\n"
            "time.sleep(30)'])")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while process_tree_cpu_s([proc.pid]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_tree_cpu_s([proc.pid]) >= 0.3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its grandchild
        proc.wait()
    assert process_tree_cpu_s([proc.pid]) == 0.0  # gone: nothing to count


def test_table_has_one_row_per_target_with_cpu_per_request():
    report = {"requests": {"completed": 10, "failed": 1, "errors": {"503 engine": 1}},
              "throughput": {"requests_per_s": 5.0, "output_tokens_per_s": 80.0},
              "latency_s": {m: {"p50": 0.01, "p99": 0.02} for m in ("ttft", "itl", "e2el")}}
    text = table([TargetRun("one", report, server_cpu_s=0.5)])
    row = text.splitlines()[2]
    assert row.startswith("one") and "50.00" in row and "10.0" in row
    assert "errors: {'503 engine': 1}" in text


def test_merge_pools_every_round_of_a_target():
    from moestack.loadtest import RequestResult, parse_scenario, summarize
    from moestack.loadtest.compare import merge

    sc = parse_scenario({"name": "m", "model": "m", "num_requests": 2, "tenants": [{"name": "t"}],
                         "prompt_tokens": {"mean": 4}, "output_tokens": {"mean": 2}})

    def run(ttfts, duration, cpu):
        results = [RequestResult(i, "t", 0.0, status=200, ttft_s=t, itl_s=[0.01], e2e_s=t + 0.01,
                                 prompt_tokens=4, completion_tokens=2) for i, t in enumerate(ttfts)]
        return TargetRun("x", summarize(sc, results, duration), cpu, results)

    merged = merge("x", sc, [run([0.1, 0.2], 1.0, 0.5), run([0.3, 0.4], 3.0, 1.5)])
    assert merged.report["requests"]["completed"] == 4
    assert merged.report["duration_s"] == 4.0 and merged.requests_per_s == 1.0
    assert merged.latency("ttft", "p50") == 0.25
    assert merged.server_cpu_s == 2.0 and merged.cpu_ms_per_request == 500.0
