"""A parallel layout (TP/PP/DP/EP) of one replica and the rules that make it valid.

vLLM orders a replica's ranks data-parallel outermost, then pipeline stages, then tensor
parallel innermost, and places consecutive ranks on the same node. So a layout is valid on
``gpus_per_node``-GPU nodes when tensor-parallel groups (two all-reduces per layer) stay inside one
node; pipeline stages and expert/data-parallel ranks may cross nodes (point-to-point sends and
all-to-all dispatch are what the inter-node network is for).
"""

from __future__ import annotations

from dataclasses import dataclass

from moestack.parallel.shapes import ModelShape


@dataclass(frozen=True)
class Layout:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def expert_group_size(self) -> int:
        """GPUs the routed experts of one layer are spread over (vLLM: TP x DP, with or
        without expert parallelism; EP places whole experts, otherwise each expert is split)."""
        return self.tensor_parallel_size * self.data_parallel_size

    def nodes(self, gpus_per_node: int) -> int:
        return -(-self.world_size // gpus_per_node)

    def describe(self) -> str:
        parts = [f"TP={self.tensor_parallel_size}", f"PP={self.pipeline_parallel_size}",
                 f"DP={self.data_parallel_size}"]
        parts.append(f"EP={self.expert_group_size}" if self.expert_parallel else "EP=off")
        return " ".join(parts)


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
                out.append(Layout(tp, pp, dp, ep))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
