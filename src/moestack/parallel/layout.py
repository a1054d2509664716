"""The rules that make a parallel layout (:class:`~moestack.config.schema.Layout`, TP/PP/DP/EP of
one replica) valid, the layouts a GPU count allows, and how vLLM runs its workers.

vLLM orders a replica's ranks data-parallel outermost, then pipeline stages, then tensor
parallel innermost, and places consecutive ranks on the same node. So a layout is valid on
``gpus_per_node``-GPU nodes when tensor-parallel groups (two all-reduces per layer) stay inside one
node; pipeline stages and expert/data-parallel ranks may cross nodes (point-to-point sends and
all-to-all dispatch are what the inter-node network is for).
"""

from __future__ import annotations

from moestack.config.schema import Layout
from moestack.parallel.shapes import ModelShape


def executor_backend(layout: Layout, accelerator: str) -> str:
    """vLLM's ``distributed_executor_backend`` for a replica of ``layout`` on ``accelerator``
    (``gpu`` or ``cpu``): one worker runs in the engine-core process (``uni``); several GPU
    workers are Ray actors in the replica's placement group, which may span nodes (``ray``);
    several CPU workers are local processes (``mp``)."""
    if layout.world_size == 1:
        return "uni"
    return "ray" if accelerator == "gpu" else "mp"


FP8_BLOCK = 128  # block size of DeepSeek-style block-wise FP8 weights


def layout_problems(layout: Layout, shape: ModelShape, gpus_per_node: int,
                    gpus_available: int, weight_dtype: str) -> list[str]:
    """Why ``layout`` cannot run ``shape`` (empty when it can, memory aside)."""
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    out: list[str] = []
    if layout.world_size > gpus_available:
        out.append(f"the layout needs {layout.world_size} GPUs (TP x PP x DP); only "
                   f"{gpus_available} are available")
    if shape.num_attention_heads % tp:
        out.append(f"TP={tp} does not divide the {shape.num_attention_heads} attention heads")
    if shape.hybrid is not None and shape.hybrid.o_groups % tp:
        out.append(f"TP={tp} does not divide the {shape.hybrid.o_groups} output-projection "
                   "groups (o_groups): vLLM splits the grouped wo_a by group")
    if not shape.is_mla and shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        out.append(f"TP={tp} and the {shape.num_kv_heads} KV heads do not divide one another")
    if tp > gpus_per_node or gpus_per_node % tp:
        out.append(f"a TP group of {tp} GPUs would straddle nodes of {gpus_per_node} GPUs: "
                   "tensor parallelism all-reduces twice per layer and must stay on NVLink; "
                   "span nodes with PP, DP or EP instead")
    if layout.world_size > gpus_per_node and layout.world_size % gpus_per_node:
        out.append(f"a multi-node replica must fill whole nodes: {layout.world_size} GPUs is not "
                   f"a multiple of {gpus_per_node} GPUs per node")
    if pp > shape.num_layers:
        out.append(f"PP={pp} exceeds the {shape.num_layers} layers")
    group = layout.expert_group_size
    if layout.expert_parallel:
        if shape.num_experts % group:
            out.append(f"EP={group} (TP x DP) does not divide the {shape.num_experts} routed "
                       "experts")
    else:
        if shape.moe_intermediate_size % group:
            out.append(f"without expert parallelism every expert is split {group} ways (TP x "
                       f"DP), which does not divide its width {shape.moe_intermediate_size}; "
                       "enable expert parallelism")
        elif weight_dtype == "fp8" and (shape.moe_intermediate_size // group) % FP8_BLOCK:
            out.append(f"without expert parallelism each expert slice would be "
                       f"{shape.moe_intermediate_size // group} wide, not a multiple of the "
                       f"{FP8_BLOCK}-wide FP8 weight blocks; enable expert parallelism")
    return out


def candidate_layouts(gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every TP/PP/DP/EP combination that uses exactly ``gpus`` GPUs (before validity)."""
    out = []
    for tp in _divisors(min(gpus, gpus_per_node)):
        if gpus % tp:
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for ep in (False, True) if tp * dp > 1 else (False,):
                out.append(Layout(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                  data_parallel_size=dp, expert_parallel=ep))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
