"""``moestack plan``: check or choose a TP/PP/DP/EP layout for an MoE model on GPUs.

Either a model and GPUs (``--model deepseek-v3 --gpu h100 --nodes 2``) or a stack config
(``--config deploy/deepseek-v3-2x8xh100.yaml``), whose models are checked as configured.
Exit status 0 when everything fits, 1 when something does not (the reasons are printed).
"""

from __future__ import annotations

import json

from moestack.errors import ConfigError


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


def _cli_plan(args):
    from dataclasses import replace

    from moestack.parallel import Layout, PlanRequest, get_gpu, get_shape, plan
    from moestack.parallel.from_config import baseline_quote, gpu_price

    if not args.model:
        raise ConfigError("plan: give --model (or --config)")
    gpu = get_gpu(args.gpu)
    gpus = args.gpus or args.nodes * gpu.gpus_per_node
    layout = None
    if args.tp or args.pp or args.dp or args.ep:
        layout = Layout(args.tp or 1, args.pp or 1, args.dp or 1, args.ep)
    shape = get_shape(args.model)
    result = plan(PlanRequest(
        shape=shape, gpu=gpu, gpus=gpus, weight_dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, context_tokens=args.context, layout=layout,
        gpu_memory_utilization=args.gpu_memory_utilization,
        usd_per_gpu_hour=gpu_price(gpu.accelerator_type, args.pricing, args.usd_per_gpu_hour)))
    return replace(result, baseline=baseline_quote(shape, args.pricing))


def _config_plans(args):
    from moestack.config import load_config
    from moestack.parallel.from_config import plan_model

    config = load_config(args.config)
    models = [m for m in config.models if args.model in (None, m.name)]
    if not models:
        raise ConfigError(f"{args.config}: no model named `{args.model}`")
    return [plan_model(m, config, usd_per_gpu_hour=args.usd_per_gpu_hour) for m in models]
