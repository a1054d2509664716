"""The layout planner: does a model fit a set of GPUs, how, and what will it cost.

:func:`plan` checks a given layout (or picks the best one) for a model shape on an accelerator
kind and returns a :class:`Plan`: weight memory per GPU, KV-cache capacity in tokens (MLA- and
DeepSeek-V4-aware, at the requested context and at 128K and 1M),
a roofline ceiling on decode tokens/s, predicted USD per 1M output tokens at that ceiling, the
reasons a layout does not fit, and the vLLM engine arguments and Ray placement bundles that
realise it.

The memory model follows vLLM: weights are split across TP ranks and PP stages; routed experts
across the TP x DP expert group; everything else is replicated per DP rank; the KV cache gets what
is left of ``gpu_memory_utilization`` x memory after weights and a runtime reserve.
The decode ceiling is a roofline: per step each GPU reads its weights (only the experts the batch
touches) and its share of the KV cache, computes 2 FLOPs per parameter per token plus attention,
and moves activations over NVLink / the network for TP all-reduces and expert dispatch. Kernel
and collective latencies are ignored, so measured decode is slower than the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from moestack.config.schema import Layout
from moestack.errors import ConfigError
from moestack.parallel import deepseek_v4
from moestack.parallel.gpus import GIB, GPUSpec
from moestack.parallel.layout import candidate_layouts, executor_backend, layout_problems
from moestack.parallel.placement import Bundle, placement_strategy, worker_bundles
from moestack.parallel.shapes import BYTES_PER_PARAM, ModelShape

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9   # vLLM's default
RUNTIME_RESERVE_GIB = 3.0              # activations, CUDA graphs, NCCL/all-to-all buffers
MAX_SEQS_PER_RANK = 256                # vLLM's default max_num_seqs
KV_BYTES = {"bf16": 2, "fp8": 1}
REPORT_CONTEXTS = (131072, 1048576)    # contexts every plan reports KV capacity at (128K, 1M)
V4_KV_CACHE_DTYPE = "fp8_ds_mla"       # the KV layout of vLLM's default V4 backend (FlashMLA)


@dataclass(frozen=True)
class ContextFigures:
    """What one replica holds and decodes at one context length."""

    context_tokens: int
    kv_capacity_tokens: int
    max_concurrent_sequences: int      # sequences that can each reach this context
    decode_ceiling_tokens_per_s: float
    usd_per_1m_output_tokens: float | None


@dataclass(frozen=True)
class BaselineQuote:
    """A proprietary API's list prices for the same model, USD per 1M tokens."""

    name: str
    provider: str
    usd_per_1m_input_tokens: float
    usd_per_1m_cached_input_tokens: float
    usd_per_1m_output_tokens: float
    as_of: str


@dataclass(frozen=True)
class PlanRequest:
    shape: ModelShape
    gpu: GPUSpec
    gpus: int                                  # GPUs one replica may use
    weight_dtype: str | None = None            # None: the checkpoint's own
    kv_cache_dtype: str = "bf16"
    context_tokens: int | None = None          # None: the model's maximum context
    layout: Layout | None = None               # None: choose one
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    usd_per_gpu_hour: float | None = None


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    gpu: GPUSpec
    layout: Layout
    weight_dtype: str
    kv_cache_dtype: str
    context_tokens: int
    gpu_memory_utilization: float
    problems: list[str]
    weight_gib_per_gpu: float
    kv_cache_gib_per_gpu: float
    kv_bytes_per_token_per_gpu: int
    kv_capacity_tokens: int                    # whole replica (all DP ranks)
    max_concurrent_sequences: int              # sequences that can each reach the full context
    single_stream_tokens_per_s: float
    decode_ceiling_tokens_per_s: float         # at max_concurrent_sequences
    usd_per_gpu_hour: float | None
    notes: list[str] = field(default_factory=list)
    cpus_per_worker: float = 1.0
    kv_fixed_bytes_per_sequence_per_gpu: int = 0   # sliding windows and compressor state
    at_contexts: tuple[ContextFigures, ...] = ()   # REPORT_CONTEXTS the model reaches
    baseline: BaselineQuote | None = None          # the model's own API, when it has one

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def nodes(self) -> int:
        return self.layout.nodes(self.gpu.gpus_per_node)

    @property
    def usd_per_hour(self) -> float | None:
        if self.usd_per_gpu_hour is None:
            return None
        return self.usd_per_gpu_hour * self.layout.world_size

    @property
    def usd_per_1m_output_tokens(self) -> float | None:
        """USD per 1M decoded tokens with the replica running at the decode ceiling."""
        if self.usd_per_hour is None or self.decode_ceiling_tokens_per_s <= 0:
            return None
        return self.usd_per_hour / (self.decode_ceiling_tokens_per_s * 3600) * 1e6

    def engine_args(self) -> dict[str, Any]:
        """vLLM engine arguments that realise this layout."""
        lay = self.layout
        args: dict[str, Any] = {
            "tensor_parallel_size": lay.tensor_parallel_size,
            "pipeline_parallel_size": lay.pipeline_parallel_size,
            "data_parallel_size": lay.data_parallel_size,
            "enable_expert_parallel": lay.expert_parallel,
            # Expert load balancing pays off once experts are placed whole across many GPUs.
            "enable_eplb": lay.expert_parallel and lay.expert_group_size >= 8,
            "max_model_len": self.context_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }
        if self.weight_dtype == "fp8" and self.shape.checkpoint_dtype != "fp8":
            args["quantization"] = "fp8"
        if self.kv_cache_dtype in ("fp8", V4_KV_CACHE_DTYPE):
            args["kv_cache_dtype"] = self.kv_cache_dtype
        if self.shape.hybrid is not None:
            # V4's compressed caches page 256 tokens (vLLM's sparse-MLA kernels); its
            # tokenizer mode renders the V4 chat format.
            args["block_size"] = deepseek_v4.KV_BLOCK_TOKENS
            args["tokenizer_mode"] = "deepseek_v4"
        if lay.world_size > 1:
            args["distributed_executor_backend"] = executor_backend(lay, "gpu")
        return args

    def placement(self) -> tuple[list[Bundle], str]:
        """Ray placement bundles (one per GPU) and strategy of one replica."""
        return (worker_bundles(self.layout.world_size, self.cpus_per_worker),
                placement_strategy(self.layout.world_size, self.gpu.gpus_per_node))


def plan(req: PlanRequest) -> Plan:
    """Check ``req.layout``, or choose the layout with the highest decode ceiling that fits."""
    if req.layout is not None:
        return _evaluate(req, req.layout)
    candidates = [_evaluate(req, lay) for lay in candidate_layouts(req.gpus,
                                                                   req.gpu.gpus_per_node)]
    if not candidates:
        raise ConfigError(f"no layout uses exactly {req.gpus} GPUs on {req.gpu.name} nodes of "
                          f"{req.gpu.gpus_per_node}")
    fitting = [p for p in candidates if p.fits]
    if fitting:
        return max(fitting, key=lambda p: (round(p.decode_ceiling_tokens_per_s, 6),
                                           -p.layout.pipeline_parallel_size,
                                           p.layout.expert_parallel,
                                           -p.layout.tensor_parallel_size))
    # Nothing fits: report the layout that comes closest (least weight memory per GPU).
    valid = [p for p in candidates if not _shape_problems(p)] or candidates
    return min(valid, key=lambda p: p.weight_gib_per_gpu)


def _shape_problems(p: Plan) -> list[str]:
    return [m for m in p.problems if "GiB" not in m and "KV cache" not in m]


def _evaluate(req: PlanRequest, lay: Layout) -> Plan:
    shape, gpu = req.shape, req.gpu
    wdtype = req.weight_dtype or shape.checkpoint_dtype
    context = req.context_tokens or shape.max_context_tokens
    tp, pp, dp = lay.tensor_parallel_size, lay.pipeline_parallel_size, lay.data_parallel_size
    problems = layout_problems(lay, shape, gpu.gpus_per_node, req.gpus, wdtype)
    notes: list[str] = []
    if context > shape.max_context_tokens:
        problems.append(f"context {context} exceeds the model's {shape.max_context_tokens} tokens")
    if wdtype == "fp8" and gpu.fp8_tflops is None:
        notes.append(f"{gpu.name} has no FP8 tensor cores: FP8 weights run as W8A16 (bf16 math)")
    if wdtype == "fp8" and shape.expert_dtype == "fp4" and gpu.fp4_tflops is None:
        notes.append(f"{gpu.name} has no FP4 tensor cores: the fp4 experts stay fp4 in memory "
                     "and are dequantized in the MoE kernel (weight-only FP4)")

    kv_dtype = req.kv_cache_dtype
    if shape.hybrid is not None:
        kv_dtype = V4_KV_CACHE_DTYPE
        notes.append("KV cache fp8_ds_mla (vLLM's FlashMLA sparse backend, the V4 default on "
                     "Hopper and Blackwell; it takes no other KV dtype): 584 B per "
                     "entry, 128-token sliding window in every layer, 1/4 (+ indexer keys) or "
                     "1/128 of the tokens in the compressed layers, whole on every TP rank")

    # Weights on the heaviest GPU: the stage with the most layers, plus one vocab matrix when
    # pipelined (first stage: embedding, last: head), both when not.
    stage_layers = -(-shape.num_layers // pp)
    stage = stage_layers / shape.num_layers
    wbytes = shape.weight_bytes(wdtype)
    embed = wbytes["embedding"] * (1.0 if pp == 1 else 0.5)          # embeddings stay bf16
    non_expert_bytes = ((wbytes["sharded"] * stage + embed) / tp
                        + wbytes["replicated"] * stage)
    expert_bytes = wbytes["routed"] * stage / lay.expert_group_size
    weight = non_expert_bytes + expert_bytes

    usable = gpu.memory_bytes * req.gpu_memory_utilization
    kv_free = usable - weight - RUNTIME_RESERVE_GIB * GIB
    kv_per_token, kv_per_seq = _kv_footprint(shape, tp, pp, kv_dtype)
    tokens_per_rank = _tokens_per_rank(kv_free, kv_per_token, kv_per_seq, context)
    if kv_free <= 0:
        problems.append(
            f"weights need {weight / GIB:.1f} GiB per GPU plus a {RUNTIME_RESERVE_GIB:g} GiB "
            f"runtime reserve, but only {usable / GIB:.1f} GiB of the {gpu.name}'s "
            f"{gpu.memory_gib:g} GiB are usable at gpu_memory_utilization="
            f"{req.gpu_memory_utilization:g}: use more GPUs"
            f"{', FP8 weights' if wdtype != 'fp8' else ''} or a larger GPU")
    elif tokens_per_rank < context:
        problems.append(
            f"after {weight / GIB:.1f} GiB of weights per GPU the KV cache holds "
            f"{tokens_per_rank} tokens per {'DP rank' if dp > 1 else 'replica'}, less than one "
            f"sequence of {context} tokens: shorten --context, use an FP8 KV cache or more GPUs")
    step_s = partial(_step_time_s, shape, gpu, lay, wdtype,
                     non_expert_bytes=non_expert_bytes, expert_bytes=expert_bytes,
                     stage_layers=stage_layers, kv_per_token=kv_per_token)

    def at(ctx: int) -> ContextFigures:
        tokens = _tokens_per_rank(kv_free, kv_per_token, kv_per_seq, ctx)
        seqs = min(MAX_SEQS_PER_RANK, tokens // ctx)
        ceiling = (max(1, seqs * dp) / (pp * step_s(ctx, batch_total=max(1, seqs * dp)))
                   if seqs else 0.0)
        usd = (req.usd_per_gpu_hour * lay.world_size / (ceiling * 3600) * 1e6
               if req.usd_per_gpu_hour is not None and ceiling > 0 else None)
        return ContextFigures(ctx, tokens * dp, seqs * dp, ceiling, usd)

    here = at(context)
    single = 1.0 / (pp * step_s(context, batch_total=1))
    return Plan(
        shape=shape, gpu=gpu, layout=lay, weight_dtype=wdtype,
        kv_cache_dtype=kv_dtype, context_tokens=context,
        gpu_memory_utilization=req.gpu_memory_utilization, problems=problems,
        weight_gib_per_gpu=weight / GIB, kv_cache_gib_per_gpu=max(0.0, kv_free) / GIB,
        kv_bytes_per_token_per_gpu=kv_per_token, kv_capacity_tokens=here.kv_capacity_tokens,
        max_concurrent_sequences=here.max_concurrent_sequences,
        single_stream_tokens_per_s=single,
        decode_ceiling_tokens_per_s=here.decode_ceiling_tokens_per_s,
        usd_per_gpu_hour=req.usd_per_gpu_hour, notes=notes,
        kv_fixed_bytes_per_sequence_per_gpu=kv_per_seq,
        at_contexts=tuple(at(c) for c in REPORT_CONTEXTS if c <= shape.max_context_tokens))


def _kv_footprint(shape: ModelShape, tp: int, pp: int, kv_dtype: str) -> tuple[int, int]:
    """(bytes per token of context, fixed bytes per running sequence) on one GPU of the stage
    with the largest cache."""
    if shape.hybrid is not None:
        ratios = deepseek_v4.stage_ratios(shape.hybrid, pp)
        return (round(deepseek_v4.kv_bytes_per_token(shape.hybrid, ratios)),
                deepseek_v4.kv_bytes_per_sequence(shape.hybrid, ratios, shape.head_dim))
    stage_layers = -(-shape.num_layers // pp)
    return (stage_layers * shape.kv_elements_per_token_per_layer(tp) * KV_BYTES[kv_dtype], 0)


def _tokens_per_rank(kv_free: float, per_token: int, per_seq: int, context: int) -> int:
    """Tokens the free memory holds as sequences of ``context`` tokens each."""
    if kv_free <= 0:
        return 0
    return int(kv_free // (per_token + per_seq / context))


def _step_time_s(shape: ModelShape, gpu: GPUSpec, lay: Layout, wdtype: str, context: int, *,
                 batch_total: int, non_expert_bytes: float, expert_bytes: float,
                 stage_layers: int, kv_per_token: int) -> float:
    """Lower bound on one decode step of one pipeline stage on its busiest GPU."""
    tp, dp = lay.tensor_parallel_size, lay.data_parallel_size
    per_rank = -(-batch_total // dp)            # sequences on the busiest DP rank
    mean_context = context / 2                  # sequences spread from empty to full
    moe_layers = shape.num_moe_layers * stage_layers / shape.num_layers
    touched = 1 - (1 - shape.experts_per_token / shape.num_experts) ** batch_total
    if shape.hybrid is not None:  # sparse reads: windows, top-k entries, indexer keys
        ratios = deepseek_v4.stage_ratios(shape.hybrid, lay.pipeline_parallel_size)
        kv_read = deepseek_v4.kv_read_bytes(shape.hybrid, ratios, mean_context)
        attn_flops_seq = deepseek_v4.attention_flops_per_token(shape, ratios, mean_context)
    else:
        kv_read = mean_context * kv_per_token
        if shape.is_mla:  # absorbed MLA: scores and values against the latent for every head
            attn_per_ctx = 2 * shape.num_attention_heads * (2 * shape.kv_lora_rank
                                                            + shape.qk_rope_head_dim)
        else:
            attn_per_ctx = 2 * shape.num_attention_heads * 2 * shape.head_dim
        attn_flops_seq = stage_layers * mean_context * attn_per_ctx
    hbm = non_expert_bytes + expert_bytes * touched + per_rank * kv_read
    t_mem = hbm / (gpu.hbm_bandwidth_gb_per_s * 1e9)

    wb = BYTES_PER_PARAM[wdtype]
    non_expert_params = non_expert_bytes / wb
    expert_flops = (2 * batch_total * moe_layers * shape.experts_per_token
                    * shape.expert_params() / lay.expert_group_size)
    attn_flops = per_rank * attn_flops_seq / tp
    flops = 2 * per_rank * non_expert_params + expert_flops + attn_flops
    tflops = gpu.fp8_tflops if (wdtype == "fp8" and gpu.fp8_tflops) else gpu.bf16_tflops
    t_compute = flops / (tflops * 1e12)

    hidden_bytes = shape.hidden_size * 2
    spans_nodes = lay.world_size > gpu.gpus_per_node
    link = (gpu.inter_node_gb_per_s if spans_nodes else gpu.intra_node_gb_per_s) * 1e9
    comm = 0.0
    if tp > 1:  # two ring all-reduces per layer inside the node
        comm += (stage_layers * 2 * 2 * (tp - 1) / tp * per_rank * hidden_bytes
                 / (gpu.intra_node_gb_per_s * 1e9))
    group = lay.expert_group_size
    if group > 1 and dp > 1:
        if lay.expert_parallel:  # all-to-all: each token goes to its top-k experts and back
            fanout = shape.experts_per_token * (group - 1) / group
        else:  # all-gather every rank's tokens, reduce-scatter the expert outputs
            fanout = dp - 1
        comm += moe_layers * 2 * per_rank * fanout * hidden_bytes / link
    return max(t_mem, t_compute) + comm
