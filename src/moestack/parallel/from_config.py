"""Plan a configured model: shape, layout, dtype and context come from its ``ModelConfig``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moestack.config.schema import ModelConfig, MoestackConfig
from moestack.errors import ConfigError
from moestack.parallel.gpus import get_gpu
from moestack.parallel.layout import Layout
from moestack.parallel.planner import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    BaselineQuote,
    Plan,
    PlanRequest,
    plan,
)
from moestack.parallel.shapes import ModelShape, get_shape, shape_from_hf_config


def layout_of(model: ModelConfig) -> Layout:
    p = model.parallelism
    return Layout(p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size,
                  p.expert_parallel)


def shape_of(model: ModelConfig, cache_dir: Path | None = None) -> ModelShape:
    """``shape`` from the catalog, else the checkpoint's config.json (tiny ones are built)."""
    if model.shape:
        return get_shape(model.shape)
    if model.path is not None:
        return shape_from_hf_config(model.path, name=model.name)
    if model.tiny is not None:
        from moestack.engine.source import resolve_checkpoint

        return shape_from_hf_config(resolve_checkpoint(model, cache_dir), name=model.name)
    raise ConfigError(f"models[{model.name}]: set `shape` so the planner knows its size",
                      param="shape")


def gpu_price(accelerator: str, pricing_file: Path | None = None,
              override: float | None = None,
              catalog_overrides: dict[str, float] | None = None) -> float:
    """USD per GPU-hour: ``override`` if given, else the pricing catalog's price (with the
    stack config's ``cost.usd_per_gpu_hour`` overrides applied)."""
    if override is not None:
        return override
    from moestack.metering.pricing import load_pricing

    return load_pricing(pricing_file, catalog_overrides).usd_per_gpu_hour(accelerator)


def baseline_quote(shape: ModelShape, pricing_file: Path | None = None) -> BaselineQuote | None:
    """The pricing catalog's prices for the API that serves ``shape`` itself (the DeepSeek API
    for DeepSeek-V4), or None when the catalog has none."""
    if shape.api_baseline is None:
        return None
    from moestack.metering.pricing import load_pricing

    b = load_pricing(pricing_file).baselines.get(shape.api_baseline)
    if b is None:
        return None
    return BaselineQuote(shape.api_baseline, b.provider, b.usd_per_1m_input_tokens,
                         b.usd_per_1m_cached_input_tokens, b.usd_per_1m_output_tokens,
                         b.as_of.isoformat())


def plan_model(model: ModelConfig, config: MoestackConfig | None = None, *,
               usd_per_gpu_hour: float | None = None) -> Plan:
    """Check the configured layout of ``model`` on its `gpu`; problems include config
    settings that would stop the layout from running as planned."""
    if model.gpu is None:
        raise ConfigError(f"models[{model.name}].gpu: name the GPU (h100, h200, ...) to plan "
                          "against", param="gpu")
    gpu = get_gpu(model.gpu)
    if model.gpus_per_node is not None:
        gpu = replace(gpu, gpus_per_node=model.gpus_per_node)
    args = model.engine_args
    weight_dtype = "fp8" if args.get("quantization") == "fp8" else None
    kv_dtype = "fp8" if str(args.get("kv_cache_dtype", "auto")).startswith("fp8") else "bf16"
    lay = layout_of(model)
    price = gpu_price(gpu.accelerator_type, config.pricing_file if config else None,
                      usd_per_gpu_hour, dict(config.cost.usd_per_gpu_hour) if config else None)
    shape = shape_of(model, config.cache_dir if config else None)
    result = plan(PlanRequest(
        shape=shape, gpu=gpu,
        gpus=lay.world_size, weight_dtype=weight_dtype, kv_cache_dtype=kv_dtype,
        context_tokens=model.max_model_len, layout=lay,
        gpu_memory_utilization=args.get("gpu_memory_utilization",
                                        DEFAULT_GPU_MEMORY_UTILIZATION),
        usd_per_gpu_hour=price))
    extra = []
    if model.accelerator != "gpu":
        extra.append(f"models[{model.name}].accelerator is `{model.accelerator}`; a GPU layout "
                     "needs `accelerator: gpu`")
    backend = args.get("distributed_executor_backend", "ray")  # the engine's default on GPU
    if lay.world_size > 1 and backend != "ray":
        extra.append(f"models[{model.name}]: {lay.world_size} GPU workers run as Ray actors in "
                     "the replica's placement group: engine_args.distributed_executor_backend "
                     f"must be `ray` (or unset), not `{backend}`")
    return replace(result, problems=[*result.problems, *extra],
                   cpus_per_worker=model.cpus_per_worker,
                   baseline=baseline_quote(shape, config.pricing_file if config else None))
