"""Plan a configured model: shape, layout, dtype and context come from its ``ModelConfig``.

Prices and a tiny model's built checkpoint come as data from the caller (``moestack plan``
reads them from the pricing catalog and the checkpoint cache): the planner only computes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moestack.config.schema import ModelConfig
from moestack.errors import ConfigError
from moestack.parallel.gpus import GPUSpec, get_gpu
from moestack.parallel.layout import executor_backend
from moestack.parallel.planner import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    Plan,
    PlanRequest,
    plan,
)
from moestack.parallel.shapes import ModelShape, get_shape, shape_from_hf_config


def gpu_of(model: ModelConfig) -> GPUSpec:
    """The catalog entry of the model's `gpu`, with its configured ``gpus_per_node``."""
    if model.gpu is None:
        raise ConfigError(f"models[{model.name}].gpu: name the GPU (h100, h200, ...) to plan "
                          "against", param="gpu")
    gpu = get_gpu(model.gpu)
    if model.gpus_per_node is not None:
        gpu = replace(gpu, gpus_per_node=model.gpus_per_node)
    return gpu


def shape_of(model: ModelConfig, checkpoint: Path | None = None) -> ModelShape:
    """``shape`` from the catalog, else the config.json of the model's ``path`` or, for a tiny
    model, of its built ``checkpoint``."""
    if model.shape:
        return get_shape(model.shape)
    folder = model.path if model.path is not None else checkpoint
    if folder is not None:
        return shape_from_hf_config(folder, name=model.name)
    raise ConfigError(f"models[{model.name}]: set `shape` so the planner knows its size",
                      param="shape")


def plan_model(model: ModelConfig, *, usd_per_gpu_hour: float | None = None,
               checkpoint: Path | None = None) -> Plan:
    """Check the configured layout of ``model`` on its `gpu`; problems include config
    settings that would stop the layout from running as planned. ``usd_per_gpu_hour`` prices
    it (None: no cost figures); ``checkpoint`` is a tiny model's built folder (its shape is
    read from it)."""
    gpu = gpu_of(model)
    args = model.engine_args
    weight_dtype = "fp8" if args.get("quantization") == "fp8" else None
    kv_dtype = "fp8" if str(args.get("kv_cache_dtype", "auto")).startswith("fp8") else "bf16"
    lay = model.parallelism
    result = plan(PlanRequest(
        shape=shape_of(model, checkpoint), gpu=gpu,
        gpus=lay.world_size, weight_dtype=weight_dtype, kv_cache_dtype=kv_dtype,
        context_tokens=model.max_model_len, layout=lay,
        gpu_memory_utilization=args.get("gpu_memory_utilization",
                                        DEFAULT_GPU_MEMORY_UTILIZATION),
        usd_per_gpu_hour=usd_per_gpu_hour))
    extra = []
    if model.accelerator != "gpu":
        extra.append(f"models[{model.name}].accelerator is `{model.accelerator}`; a GPU layout "
                     "needs `accelerator: gpu`")
    need = executor_backend(lay, "gpu")
    backend = args.get("distributed_executor_backend", need)
    if lay.world_size > 1 and backend != need:
        extra.append(f"models[{model.name}]: {lay.world_size} GPU workers run as Ray actors in "
                     "the replica's placement group: engine_args.distributed_executor_backend "
                     f"must be `{need}` (or unset), not `{backend}`")
    return replace(result, problems=[*result.problems, *extra],
                   cpus_per_worker=model.cpus_per_worker)
