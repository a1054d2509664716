#!/usr/bin/env bash
# Run the test suite with the environment vLLM and Ray need on a small CPU machine.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# vLLM leaves sockets and Ray leaves session files behind: keep them in a per-run folder.
run_tmp="$(mktemp -d /tmp/moestack-test.XXXXXX)"
trap 'rm -rf "$run_tmp"' EXIT
export TMPDIR="$run_tmp" RAY_TMPDIR="$run_tmp"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}"
export MOESTACK_CACHE_DIR="${MOESTACK_CACHE_DIR:-$here/.cache/moestack}"
export PYTHONUNBUFFERED=1
cd "$here"
# The host first: machines of one kind differ in CPU, and vLLM's CPU kernels with them.
.venv/bin/python -m moestack.vllm_cpu.libraries
set +e
.venv/bin/python -m pytest "${@:-tests}" -p no:cacheprovider
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
exit $rc
