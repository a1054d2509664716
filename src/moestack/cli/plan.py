"""``moestack plan``: check or choose a TP/PP/DP/EP layout for an MoE model on GPUs.

Either a model and GPUs (``--model deepseek-v3 --gpu h100 --nodes 2``) or a stack config
(``--config deploy/deepseek-v3-2x8xh100.yaml``), whose models are checked as configured.
Exit status 0 when everything fits, 1 when something does not (the reasons are printed).

The planner (:mod:`moestack.parallel`) only computes: this command prices its plans from the
pricing catalog (:mod:`moestack.metering.pricing`) and hands it a tiny model's built checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from moestack.errors import ConfigError

if TYPE_CHECKING:
    from moestack.config.schema import ModelConfig, MoestackConfig
    from moestack.parallel import ModelShape, Plan
    from moestack.parallel.planner import BaselineQuote


def parse_tokens(text: str) -> int:
    """``32k`` -> 32768, ``128K`` -> 131072, ``1m`` -> 1048576, ``4096`` -> 4096."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        return int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ConfigError(f"--context: `{text}` is not a token count like 4096, 32k or "
                          "1m") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="check or choose a parallel layout (TP/PP/DP/EP) "
                              "for an MoE model: memory, KV cache, decode roofline, cost")
    p.add_argument("--config", "-c", help="plan the models of this stack config as configured")
    p.add_argument("--model", "-m", help="catalog shape (deepseek-v4-flash, deepseek-v4-pro, "
                   "deepseek-v3, mixtral-8x7b, qwen3-30b-a3b, ...) or a checkpoint folder; with "
                   "--config: a model name")
    p.add_argument("--gpu", default="h100", help="GPU catalog entry (h100, h200, a100, l40s, "
                   "b200)")
    p.add_argument("--nodes", type=int, default=1, help="nodes one replica may span")
    p.add_argument("--gpus", type=int, help="GPUs one replica may use (default: all GPUs of "
                   "--nodes)")
    p.add_argument("--dtype", choices=("bf16", "fp8"), help="weight dtype (default: the "
                   "checkpoint's)")
    p.add_argument("--kv-cache-dtype", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--context", type=parse_tokens, help="context tokens, e.g. 32k or 1m (default: "
                   "the model's maximum)")
    p.add_argument("--tp", type=int, help="check this tensor_parallel_size")
    p.add_argument("--pp", type=int, help="check this pipeline_parallel_size")
    p.add_argument("--dp", type=int, help="check this data_parallel_size")
    p.add_argument("--ep", action="store_true", help="check with expert parallelism")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--usd-per-gpu-hour", type=float, help="price override (default: the "
                   "pricing catalog)")
    p.add_argument("--pricing", help="pricing catalog YAML (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from moestack.parallel.report import format_plan, plan_to_dict

    plans = _config_plans(args) if args.config else [_cli_plan(args)]
    if args.json:
        out = [plan_to_dict(p) for p in plans]
        print(json.dumps(out if args.config else out[0], indent=2))
    else:
        print("\n\n".join(format_plan(p) for p in plans))
    return 0 if all(p.fits for p in plans) else 1


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
    from moestack.parallel.planner import BaselineQuote

    b = load_pricing(pricing_file).baselines.get(shape.api_baseline)
    if b is None:
        return None
    return BaselineQuote(shape.api_baseline, b.provider, b.usd_per_1m_input_tokens,
                         b.usd_per_1m_cached_input_tokens, b.usd_per_1m_output_tokens,
                         b.as_of.isoformat())


def plan_configured(model: ModelConfig, config: MoestackConfig | None = None, *,
                    usd_per_gpu_hour: float | None = None) -> Plan:
    """Plan ``model`` as configured, priced from the config's pricing catalog (with its
    ``cost.usd_per_gpu_hour`` overrides) unless ``usd_per_gpu_hour`` is given; a tiny model
    without `shape` is built to read its shape."""
    from moestack.parallel.from_config import gpu_of, plan_model

    pricing = config.pricing_file if config else None
    price = gpu_price(gpu_of(model).accelerator_type, pricing, usd_per_gpu_hour,
                      dict(config.cost.usd_per_gpu_hour) if config else None)
    checkpoint = None
    if model.tiny is not None and not model.shape:
        from moestack.engine.source import resolve_checkpoint

        checkpoint = resolve_checkpoint(model, config.cache_dir if config else None)
    p = plan_model(model, usd_per_gpu_hour=price, checkpoint=checkpoint)
    return replace(p, baseline=baseline_quote(p.shape, pricing))


def _cli_plan(args):
    from moestack.config.schema import Layout
    from moestack.parallel import PlanRequest, get_gpu, get_shape, plan

    if not args.model:
        raise ConfigError("plan: give --model (or --config)")
    gpu = get_gpu(args.gpu)
    gpus = args.gpus or args.nodes * gpu.gpus_per_node
    layout = None
    if args.tp or args.pp or args.dp or args.ep:
        layout = Layout(tensor_parallel_size=args.tp or 1, pipeline_parallel_size=args.pp or 1,
                        data_parallel_size=args.dp or 1, expert_parallel=args.ep)
    shape = get_shape(args.model)
    result = plan(PlanRequest(
        shape=shape, gpu=gpu, gpus=gpus, weight_dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, context_tokens=args.context, layout=layout,
        gpu_memory_utilization=args.gpu_memory_utilization,
        usd_per_gpu_hour=gpu_price(gpu.accelerator_type, args.pricing, args.usd_per_gpu_hour)))
    return replace(result, baseline=baseline_quote(shape, args.pricing))


def _config_plans(args):
    from moestack.config import load_config

    config = load_config(args.config)
    models = [m for m in config.models if args.model in (None, m.name)]
    if not models:
        raise ConfigError(f"{args.config}: no model named `{args.model}`")
    return [plan_configured(m, config, usd_per_gpu_hour=args.usd_per_gpu_hour) for m in models]
