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
