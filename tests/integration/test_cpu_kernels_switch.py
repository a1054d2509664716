"""``MOESTACK_VLLM_CPU_KERNELS=avx2``: what an AVX2-only host runs, exercised on any host.

vLLM's processes load the AVX2 kernel library with the switch on; the tiny DeepSeek-V3 runs on
it; and where DeepSeek-V4's kernels are missing from it, ``moestack up`` refuses V4 at once
with the reason instead of failing in the engine minutes later.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from moestack.vllm_cpu import libraries as cpu_kernels
from moestack.testing.stack_process import short_temp_dir

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AVX2_ENV = {cpu_kernels.SWITCH_ENV: "avx2", "ATEN_CPU_CAPABILITY": "avx2"}

OFFLINE = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        from pathlib import Path
        from moestack.engine.tiny import TinySpec, ensure_tiny_model
        ckpt = ensure_tiny_model(TinySpec("deepseek-v3"), Path(sys.argv[1]))
        from vllm import LLM, SamplingParams
        llm = LLM(model=str(ckpt), enforce_eager=True, max_model_len=512,
                  distributed_executor_backend="uni")
        import torch
        out = llm.generate(["The planner places experts"],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        print("AVX512_BF16_KERNELS", hasattr(torch.ops._C, "convert_weight_packed"))
        print("TOKENS", len(out[0].outputs[0].token_ids))
""")


def _env(tmp, **extra):
    return {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **extra}


def test_vllm_loads_the_avx2_kernels_and_serves_the_tiny_v3_with_the_switch(tmp_path):
    cache = os.environ.get("MOESTACK_CACHE_DIR", str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", OFFLINE, cache], capture_output=True, text=True,
                         env=_env(tmp_path, **AVX2_ENV), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "AVX512_BF16_KERNELS False" in out.stdout  # _C_AVX2, not _C
    assert "TOKENS 8" in out.stdout


def test_up_refuses_deepseek_v4_at_once_where_its_kernels_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.SWITCH_ENV, "avx2")
    reason = cpu_kernels.unsupported_reason("deepseek_v4")
    if reason is None:
        pytest.skip("moestack's CPU shim supplies every DeepSeek-V4 kernel the AVX2 library "
                    "lacks: V4 runs there (tests/integration/test_tiny_v4_avx2.py)")
    tmp = short_temp_dir()
    with open(os.path.join(REPO, "deploy", "local-deepseek-v4.yaml")) as f:
        config = yaml.safe_load(f)
    config["storage"] = {"url": f"sqlite:///{tmp / 'moestack.db'}"}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "moestack", "up", "--config", str(tmp / "config.yaml")],
        capture_output=True, text=True, timeout=300,
        env=_env(tmp, MOESTACK_ADMIN_KEY="k" * 40, **AVX2_ENV))
    took_s = time.monotonic() - t0
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"error: model tiny-deepseek-v4: {reason}" in out.stdout
    assert "convert_weight_packed" in out.stdout and "starting Ray" not in out.stdout
    print(f"moestack up refused V4 on the AVX2 kernels in {took_s:.1f} s")
