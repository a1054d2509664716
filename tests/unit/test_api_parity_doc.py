"""The README's API parity table is generated from the installed vLLM and must be current."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_parity_table_lists_every_route_and_field_of_the_installed_vllm():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_parity.py"), "--check"],
                         capture_output=True, text=True, env={**os.environ,
                                                              "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
