import pytest

from pathlib import Path

from moestack.config.schema import ModelConfig
from moestack.engine.vllm_engine import engine_args_for


def model(**overrides) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "path": "/ckpt", **overrides})


def test_single_worker_runs_in_the_engine_core_process():
    args = engine_args_for(model(), Path("/ckpt"))
    assert args["distributed_executor_backend"] == "uni"
    assert (args["model"], args["served_model_name"]) == ("/ckpt", ["m"])


def test_multi_gpu_replica_uses_ray_workers_and_multi_cpu_uses_processes():
    par = {"tensor_parallel_size": 4, "data_parallel_size": 2, "expert_parallel": True}
    gpu = engine_args_for(model(accelerator="gpu", parallelism=par), Path("/ckpt"))
    assert gpu["distributed_executor_backend"] == "ray"
    assert (gpu["tensor_parallel_size"], gpu["data_parallel_size"],
            gpu["enable_expert_parallel"]) == (4, 2, True)
    cpu = engine_args_for(model(parallelism={"tensor_parallel_size": 2}), Path("/ckpt"))
    assert cpu["distributed_executor_backend"] == "mp"


def test_engine_args_escape_hatch_is_applied_last():
    args = engine_args_for(model(engine_args={"distributed_executor_backend": "mp",
                                              "max_num_seqs": 8}), Path("/ckpt"))
    assert args["distributed_executor_backend"] == "mp" and args["max_num_seqs"] == 8


def test_replica_refuses_a_vllm_release_line_it_was_not_built_for():
    from moestack.engine.vllm_engine import SUPPORTED_VLLM, check_vllm_version
    from moestack.errors import ConfigError

    check_vllm_version(f"{SUPPORTED_VLLM}.0")
    check_vllm_version(f"{SUPPORTED_VLLM}.3+cpu")
    for other in ("0.31.2", "0.33.0", "1.0.0", f"{SUPPORTED_VLLM}0.1"):
        with pytest.raises(ConfigError, match="serving layer"):
            check_vllm_version(other)


def test_serving_config_becomes_vllm_serve_flags():
    from pathlib import Path

    from moestack.config.schema import ModelConfig
    from moestack.engine.vllm_engine import frontend_flags

    tiny = ModelConfig.model_validate({"name": "t", "tiny": {"arch": "deepseek-v3"}})
    flags = frontend_flags(tiny, Path("/ckpt"))
    assert flags[flags.index("--structured-outputs-config") + 1] == \
        '{"backend": "xgrammar", "disable_any_whitespace": true}'
    assert "--enable-prompt-tokens-details" in flags and "--tool-call-parser" not in flags
    real = ModelConfig.model_validate({
        "name": "r", "path": "/ckpt", "serving": {
            "tool_call_parser": "deepseek_v3", "reasoning_parser": "deepseek_r1",
            "structured_outputs": {"backend": "guidance", "options": {"disable_fallback": True}}}})
    flags = frontend_flags(real, Path("/ckpt"))
    assert flags[flags.index("--tool-call-parser") + 1] == "deepseek_v3"
    assert "--enable-auto-tool-choice" in flags
    assert flags[flags.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert '"disable_fallback": true' in flags[flags.index("--structured-outputs-config") + 1]
