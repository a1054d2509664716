"""The Helm binary the chart's tests, tools and benchmarks render with."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def helm_binary() -> str:
    """The Helm that scripts/install-helm.sh puts beside the venv's python, else one on PATH."""
    beside = Path(sys.executable).parent / "helm"
    found = str(beside) if beside.exists() else shutil.which("helm")
    if not found:
        raise RuntimeError("no helm binary: run scripts/install-helm.sh .venv")
    return found
