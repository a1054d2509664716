"""Render a :class:`Plan` for people (text) and for machines (a JSON-ready dict)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from moestack.parallel.planner import Plan


def plan_to_dict(p: Plan) -> dict[str, Any]:
    bundles, strategy = p.placement()
    lay = p.layout
    return {
        "model": p.shape.name, "gpu": p.gpu.name, "fits": p.fits, "problems": list(p.problems),
        "notes": list(p.notes),
        "layout": {"tensor_parallel_size": lay.tensor_parallel_size,
                   "pipeline_parallel_size": lay.pipeline_parallel_size,
                   "data_parallel_size": lay.data_parallel_size,
                   "expert_parallel": lay.expert_parallel,
                   "expert_parallel_size": lay.expert_group_size if lay.expert_parallel else 1,
                   "gpus": lay.world_size, "nodes": p.nodes},
        "params": {"total": p.shape.total_params(), "active": p.shape.active_params()},
        "weight_dtype": p.weight_dtype, "kv_cache_dtype": p.kv_cache_dtype,
        "context_tokens": p.context_tokens,
        "memory_per_gpu_gib": {"total": p.gpu.memory_gib,
                               "usable": p.gpu.memory_gib * p.gpu_memory_utilization,
                               "weights": round(p.weight_gib_per_gpu, 2),
                               "kv_cache": round(p.kv_cache_gib_per_gpu, 2)},
        "kv_cache": {"bytes_per_token_per_gpu": p.kv_bytes_per_token_per_gpu,
                     "fixed_bytes_per_sequence_per_gpu": p.kv_fixed_bytes_per_sequence_per_gpu,
                     "capacity_tokens": p.kv_capacity_tokens,
                     "max_concurrent_sequences": p.max_concurrent_sequences},
        "at_context": [asdict(c) for c in p.at_contexts],
        "baseline": asdict(p.baseline) if p.baseline else None,
        "decode_roofline_tokens_per_s": {"single_stream": round(p.single_stream_tokens_per_s, 1),
                                         "batch_ceiling": round(p.decode_ceiling_tokens_per_s,
                                                                1)},
        "usd_per_gpu_hour": p.usd_per_gpu_hour, "usd_per_hour": p.usd_per_hour,
        "usd_per_1m_output_tokens": p.usd_per_1m_output_tokens,
        "vllm_engine_args": p.engine_args(),
        "ray_placement": {"bundles": bundles, "strategy": strategy},
    }


def format_plan(p: Plan) -> str:
    s, g, lay = p.shape, p.gpu, p.layout
    bundles, strategy = p.placement()
    weights = p.weight_dtype + (f" ({s.expert_dtype} experts)" if s.expert_dtype
                                and p.weight_dtype == "fp8" else "")
    lines = [
        f"{s.name}: {s.total_params() / 1e9:.1f}B params ({s.active_params() / 1e9:.1f}B active),"
        f" {s.num_layers} layers, {s.num_experts} experts top-{s.experts_per_token}"
        f"{f' + {s.num_shared_experts:g} shared' if s.num_shared_experts else ''},"
        f" {_attention_kind(s)} attention; weights {weights},"
        f" KV cache {p.kv_cache_dtype}, context {p.context_tokens} tokens",
        f"layout: {lay.describe()} on {lay.world_size} x {g.name} ({p.nodes} node(s) of "
        f"{g.gpus_per_node})",
        f"memory per GPU: {p.weight_gib_per_gpu:.1f} GiB weights, {p.kv_cache_gib_per_gpu:.1f}"
        f" GiB KV cache, of {g.memory_gib * p.gpu_memory_utilization:.1f} GiB usable "
        f"({g.memory_gib:g} GiB x {p.gpu_memory_utilization:g})",
        f"KV cache: {p.kv_bytes_per_token_per_gpu} bytes/token/GPU"
        + (f" + {p.kv_fixed_bytes_per_sequence_per_gpu / 2**20:.1f} MiB/sequence/GPU fixed"
           if p.kv_fixed_bytes_per_sequence_per_gpu else "")
        + f", {p.kv_capacity_tokens:,} tokens per replica, {p.max_concurrent_sequences} "
        "sequences at full context",
        f"decode roofline: {p.single_stream_tokens_per_s:,.0f} tokens/s single stream, "
        f"{p.decode_ceiling_tokens_per_s:,.0f} tokens/s at {p.max_concurrent_sequences} "
        "sequences",
    ]
    if p.usd_per_1m_output_tokens is not None:
        lines.append(f"cost: {p.usd_per_hour:.2f} USD/hour ({p.usd_per_gpu_hour:g} per GPU-hour)"
                     f" -> {p.usd_per_1m_output_tokens:.3f} USD per 1M output tokens at the "
                     "ceiling")
    for c in p.at_contexts:
        usd = (f", {c.usd_per_1m_output_tokens:.3f} USD/1M output tokens"
               if c.usd_per_1m_output_tokens is not None else "")
        lines.append(f"  at {_tokens(c.context_tokens)} context: {c.kv_capacity_tokens:,} KV "
                     f"tokens = {c.max_concurrent_sequences} sequences, decode ceiling "
                     f"{c.decode_ceiling_tokens_per_s:,.0f} tokens/s{usd}")
    if p.baseline is not None:
        b = p.baseline
        lines.append(f"baseline {b.name} ({b.provider} API, {b.as_of}): "
                     f"{b.usd_per_1m_input_tokens:g} input / {b.usd_per_1m_cached_input_tokens:g}"
                     f" cached input / {b.usd_per_1m_output_tokens:g} output USD per 1M tokens"
                     + _versus(p.usd_per_1m_output_tokens, b.usd_per_1m_output_tokens))
    lines.append(f"vLLM engine args: {p.engine_args()}")
    lines.append(f"Ray placement: {len(bundles)} x {bundles[0]} bundles, {strategy}")
    lines += [f"note: {n}" for n in p.notes]
    if p.fits:
        lines.append("FITS")
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  - {m}" for m in p.problems]
    return "\n".join(lines)


def _attention_kind(s) -> str:
    if s.hybrid is not None:
        ratios = s.hybrid.compress_ratios
        return (f"hybrid (sliding {s.hybrid.sliding_window} in all; {ratios.count(4)} CSA/4 "
                f"layers with top-{s.hybrid.index_topk} indexer, {ratios.count(128)} HCA/128, "
                f"{ratios.count(0)} window-only)")
    return "MLA" if s.is_mla else "GQA"


def _tokens(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def _versus(self_hosted: float | None, api: float) -> str:
    if self_hosted is None:
        return ""
    return (f"; self-hosted at the ceiling {self_hosted:.3f} USD per 1M output = "
            f"{self_hosted / api:.2f}x the API")
