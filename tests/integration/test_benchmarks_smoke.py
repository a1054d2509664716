"""Benchmarks cannot rot: the scripts in ``benchmarks/`` that start Ray, vLLM or a database
server run with ``--smoke`` (seconds of load, one round) and print their figures. The others run
in ``tests/unit/test_benchmarks_smoke.py``, which also checks that every script is covered."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from moestack.vllm_cpu.libraries import SWITCH_ENV, cpu_flags

from tests.unit.test_benchmarks_smoke import NUM, assert_figures, run_benchmark

pytestmark = pytest.mark.integration

MS = rf"{NUM} ?ms"
FIGURES = {
    "admission.py": [
        rf"^\s+sqlite\s+1,000 rows: {NUM} ms per admit \+ settle",
        rf"^\s+1,000\s+{NUM}\s+{NUM}",
        rf"^largest ledger vs empty: {NUM}x",
        rf"one gateway process, SQLite: {NUM} admit \+ settle per second \(100 requests"],
    "engine_token_cost.py": [
        rf"^prefill: \d+ tokens in {NUM} s -> {NUM} replica-s/token \({NUM} tok/s\)$",
        rf"^decode:  \d+ tokens in {NUM} s -> {NUM} replica-s/token \({NUM} tok/s\)$",
        rf"^decode / prefill cost ratio: {NUM}x$",
        rf"^at {NUM} USD/replica-hour, fully utilised: input {NUM} USD/1M, output {NUM} USD/1M$",
        rf"^\s+prefill_s_per_token: {NUM}$", rf"^\s+decode_s_per_token: {NUM}$"],
    "tensor_parallel_cpu.py": [rf"^\s+2\s+0\|1\s+{NUM}\s+16\s+{NUM}\s+1\.00$"],
    "tiny_v4_vs_v3.py": [  # --smoke takes the suite's cached checkpoints: no build time
        *(rf"^cached {a}: {NUM}M parameters \(.+\)$" for a in ("deepseek-v3", "deepseek-v4")),
        *(rf"^{a}\s+-\s+{NUM}M\s+{NUM}\s+{NUM}\s+{NUM}$" for a in ("deepseek-v3",
                                                                   "deepseek-v4")),
        rf"^V4/V3 tokens/s {NUM}: (meets|misses) the embedded-default speed rule"],
    "tiny_v4_avx2.py": [  # --smoke takes the suite's cached checkpoint: no build time
        r"^cached deepseek-v4: .+$",
        rf"^round 1/1 avx2: load {NUM} s, {NUM} tokens/s$",
        rf"^avx2\s+_C_AVX2 \+ 16 moestack torch kernels\s+{NUM}\s+{NUM}\s+-$"],
    "fairness.py": [
        *(rf"^prio\+reserve\s+{scen}\s+{t}\s+{NUM}\s+{NUM}\s+{NUM}$"
          for scen, tenants in (("1:3", ("a1", "a3")), ("1:2:4", ("w1", "w2", "w4")),
                                ("late", ("early1", "early2", "late"))) for t in tenants),
        rf"^prio\+reserve\s+1:3\s+Jain's index of share/weight: {NUM}$",
        rf"^prio\+reserve\s+{MS}\s+{MS}\s+{MS}\s+{MS}\s+{NUM}\s+{MS}\s+\d+\s+\d+\s+{NUM}$",
        rf"^prio\+reserve\s+{MS}\s+{MS}\s+{NUM}\s+{MS}\s+{MS}\s+{MS}; {MS}$",
        r"^plot: .*fairness_fake\.png$"],
    "queue_scaling.py": [
        *(rf"^{v}\s+{NUM}\s+{NUM}\s+{NUM}\s+\d+\s+{NUM}$" for v in ("queue-off", "queue-on")),
        rf"^on/off: drain {NUM}x, e2e p95 {NUM}x, replica-seconds {NUM}x$",
        r"^plot: .*queue_scaling\.png$"],
    "gateway_capacity.py": [
        *(rf"^{re.escape(t)}\s+40\s+0\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}"
          for t in ("backend alone (uvicorn)", "moestack direct, tenancy on")),
        rf"^\s+moestack direct, tenancy on\s+CPU {NUM} ms/request, requests/s {NUM}x backend "
        r"alone$",
        rf"^  server CPU by process \(ms/request\): Gateway {NUM}, ModelServer {NUM}, Serve "
        rf"proxy {NUM}, Ray and driver {NUM}$"],
    "gateway_overhead.py": [
        rf"^moestack \(proxy ingress, tenancy on\) adds TTFT p50 {MS}, p99 {MS}; TPOT p50 {MS}"
        rf"; E2E p50 {MS}$",
        rf"saturated throughput moestack / vLLM: requests/s {NUM}, output tokens/s {NUM}",
        rf"^\s+median of rounds \(proxy\): throughput {NUM}x, CPU {NUM}x, added TTFT p50 {MS}"],
    # Run by the suite's migration probe (tests/integration/test_migration_replicas.py).
    "migration.py": [
        rf"^Ray and 2 replicas ran {NUM} s after the start$",
        r"^streams \d+, client-visible errors \d+$",
        rf"^requests migrated \d+; extra TTFT of a migrated request .* p50 ({NUM}|None) s",
        r"^ledger rows \d+ for \d+ answers; tenant tokens prompt \d+ \(expected \d+\), "
        r"completion \d+ \(expected \d+\)$",
        rf"^scale-down 2 -> 1 under \d+ streams \(streams move after {NUM} s\): the draining "
        rf"replica had no request under way ({NUM} s|never) and (stopped {NUM} s|did not stop) "
        rf"after the scale-down; last stream ended at {NUM} s; client-visible errors \d+; "
        rf"streams moved \d+$",
        rf"^rolling update took {NUM} s; streams \d+, client-visible errors \d+, migrated \d+ "
        rf"\(moved off a draining replica \d+\), longest stream {NUM} s$",
        rf"^the killed replica's successor ran ({NUM}|-) s after the kill$",
        r"^/dev/shm files of the stack left unused after the kill: \d+$",
        r"^/dev/shm files of the stack left after the stop: \d+$"],
}
"""Benchmarks run here -> the figure lines their smoke run must print (regexes, per line)."""

POSTGRES_FIGURES = [
    rf"^\s+postgresql\s+1,000 rows: {NUM} ms per admit \+ settle",
    rf"^budget worth 37 requests \({NUM} USD\): 80 concurrent requests, 37 admitted, 37 rows, "
    rf"{NUM} USD spent: exact$",
    r"^requests_per_min 50: 80 concurrent requests, 50 admitted, 50 rows: exact$"]
"""admission.py on PostgreSQL: the exact limits hold with two gateway processes."""

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""vLLM's engine in the benchmark's own process (as the other integration tests run it)."""


def test_admission_smoke_prints_its_figures_on_sqlite_and_postgresql():
    out = run_benchmark("admission.py")
    patterns = FIGURES["admission.py"]
    if "PostgreSQL skipped:" not in out:  # the script says why when no server can start
        patterns = patterns + POSTGRES_FIGURES
    assert_figures("admission.py", out, patterns)


def test_engine_token_cost_smoke_prints_both_costs_and_the_config_snippet():
    out = run_benchmark("engine_token_cost.py", env=ENGINE_ENV)
    assert_figures("engine_token_cost.py", out, FIGURES["engine_token_cost.py"])


def test_tensor_parallel_cpu_smoke_times_tensor_parallel_2(tensor_parallel_smoke):
    out = tensor_parallel_smoke[0]  # the replica's checks: test_tensor_parallel_cpu.py
    assert_figures("tensor_parallel_cpu.py", out, FIGURES["tensor_parallel_cpu.py"])


def v4_unsupported_reason() -> str | None:
    """Why the tiny DeepSeek-V4 cannot run on this host's vLLM CPU kernels; None: it runs."""
    from moestack.vllm_cpu.libraries import unsupported_reason

    return unsupported_reason("deepseek_v4")


def test_tiny_v4_vs_v3_smoke_loads_and_times_both_cached_models():
    if reason := v4_unsupported_reason():
        pytest.skip(reason)
    out = run_benchmark("tiny_v4_vs_v3.py", timeout_s=600)
    assert_figures("tiny_v4_vs_v3.py", out, FIGURES["tiny_v4_vs_v3.py"])


def test_tiny_v4_avx2_smoke_times_the_avx2_path_against_the_native_one(tiny_v4_avx2_smoke):
    out = tiny_v4_avx2_smoke[0]  # its kernel reports: tests/integration/test_tiny_v4_avx2.py
    assert_figures("tiny_v4_avx2.py", out, FIGURES["tiny_v4_avx2.py"])
    if "avx512_bf16" in cpu_flags() and not os.environ.get(SWITCH_ENV):
        assert_figures("tiny_v4_avx2.py", out, [
            rf"^native\s+_C \(native\)\s+{NUM}\s+{NUM}\s+-$",
            rf"^AVX2/native tokens/s {NUM}; 2 prompts x 8 tokens, median of 1 rounds$"])


@pytest.mark.parametrize("script", ["fairness.py", "queue_scaling.py"])
def test_ray_serve_benchmark_smoke_prints_its_figures_and_plot(script, tmp_path):
    out = run_benchmark(script, "--out", str(tmp_path), timeout_s=600)
    assert_figures(script, out, FIGURES[script])
    png = Path(re.search(r"^plot: (.+\.png)$", out, re.MULTILINE).group(1))
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script", ["gateway_capacity.py", "gateway_overhead.py"])
def test_stack_benchmark_smoke_prints_its_figures(script):
    out = run_benchmark(script, timeout_s=600)
    assert_figures(script, out, FIGURES[script])
