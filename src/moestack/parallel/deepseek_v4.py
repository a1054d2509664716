"""DeepSeek-V4 hybrid attention: parameters, checkpoint bytes and the KV cache as vLLM lays it out.

V4 is not V3 with more experts. Every layer keeps a 128-token sliding window of uncompressed
KV; layers with ``compress_ratio`` 4 (CSA) also keep one compressed entry per 4 tokens plus a
lightning-indexer key per entry, which picks the ``index_topk`` entries a query reads; layers
with ratio 128 (HCA) keep one entry per 128 tokens and read them all. Attention is multi-query
(one 512-wide latent is both K and V), queries come through a LoRA (``q_lora_rank``), the output
through a grouped LoRA (``o_groups`` x ``o_lora_rank``); ``hc_mult`` hyper-connection streams
replace the single residual; the first ``num_hash_layers`` MoE gates route by token id.

Byte figures follow vLLM (``vllm/models/deepseek_v4/attention.py``, ``compressor.py``,
``vllm/v1/attention/backends/mla/sparse_swa.py``, ``vllm/v1/kv_cache_interface.py``):

- KV entries are stored in the ``fp8_ds_mla`` layout of vLLM's default V4 attention backend on
  Hopper and Blackwell (FlashMLA sparse; it accepts no other KV dtype; the opt-in FlashInfer
  backend on SM100 stores plain rows instead): 448 B fp8 no-RoPE part + 128 B bf16 RoPE part
  + 8 B UE8M0 scales = 584 B per entry, in pages padded to a multiple of 576 B. Compressed
  layers use 256-token blocks (256 / ratio entries per page); the sliding-window cache uses
  64-token blocks.
- The indexer keys are fp8 with fp32 scales: 128 + 4 = 132 B per compressed entry (ratio-4
  layers only), same 256-token blocks.
- A running sequence also holds fixed state: its sliding-window blocks (window / 64 + 1 per
  layer) and the compressors' fp32 pooling state (2 x overlap x head_dim floats per token slot,
  over a window of overlap x ratio tokens, in blocks of 4 (ratio 4) or 8 (ratio 128) slots).
- Capacity sums these pages over the layers. vLLM's hybrid allocator groups layers and shares
  one block pool between the groups, which can leave some of it unused; that loss is not
  modelled, so capacity is an upper bound.
- Weights: dense projections fp8 e4m3 with one UE8M0 scale per 128 x 128 block; routed experts
  fp4 (e2m1, two per byte) with one UE8M0 scale per 32 inputs; embeddings, head, gates, norms,
  compressors and the indexer's ``weights_proj`` bf16; hyper-connection tensors, compressor
  position biases and attention sinks fp32; hash-gate tables int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moestack.parallel.shapes import ModelShape

KV_ENTRY_BYTES = 584          # fp8_ds_mla: 448 fp8 + 64 x bf16 RoPE + 8 UE8M0 scales
KV_PAGE_ALIGN_BYTES = 576     # FlashMLA packing stride every page is padded to
KV_BLOCK_TOKENS = 256         # block size of the compressed and indexer caches
SWA_BLOCK_TOKENS = 64         # block size of the sliding-window cache
FP8_BLOCK = 128               # weight_block_size [128, 128], one UE8M0 scale per block
FP4_GROUP = 32                # MXFP4: one UE8M0 scale per 32 weights


@dataclass(frozen=True)
class HybridAttention:
    """The V4-only figures of a DeepSeek-V4 ``config.json``."""

    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    rope_head_dim: int
    sliding_window: int
    compress_ratios: tuple[int, ...]   # one per main layer (0: sliding window only)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    num_hash_layers: int
    num_mtp_layers: int = 1
    mtp_compress_ratio: int = 0        # the trailing compress_ratios entry (the MTP layer)

    @property
    def hc_mix(self) -> int:
        """Width of each hyper-connection mixing projection: (2 + n) x n."""
        return (2 + self.hc_mult) * self.hc_mult


# -- parameters --------------------------------------------------------------------------------
def _attention_parts(s: ModelShape, ratio: int) -> dict[str, int]:
    """Parameters of one attention block by storage dtype (``fp8`` counts fp8 weights)."""
    v, h, hd, heads = s.hybrid, s.hidden_size, s.head_dim, s.num_attention_heads
    fp8 = (h * v.q_lora_rank + v.q_lora_rank * heads * hd + h * hd      # wq_a, wq_b, wkv
           + heads * hd * v.o_lora_rank + v.o_groups * v.o_lora_rank * h)  # wo_a, wo_b
    bf16 = v.q_lora_rank + hd                                           # q_norm, kv_norm
    f32 = heads                                                         # attn_sink
    if ratio > 1:
        bf16_c, f32_c = _compressor(h, hd, ratio)
        bf16, f32 = bf16 + bf16_c, f32 + f32_c
    if ratio == 4:  # lightning indexer: its own query projection, head weights, compressor
        fp8 += v.q_lora_rank * v.index_n_heads * v.index_head_dim
        bf16_c, f32_c = _compressor(h, v.index_head_dim, ratio)
        bf16 += h * v.index_n_heads + bf16_c
        f32 += f32_c
    return {"fp8": fp8, "bf16": bf16, "f32": f32}


def _compressor(hidden: int, dim: int, ratio: int) -> tuple[int, int]:
    """(bf16, fp32) parameters of a compressor: wkv + wgate, norm; ape position bias."""
    coff = 2 if ratio == 4 else 1          # ratio-4 windows overlap
    return 2 * hidden * coff * dim + dim, ratio * coff * dim


def _block_parts(s: ModelShape, ratio: int, hash_gate: bool) -> dict[str, int]:
    """One transformer block without its routed experts."""
    v, h = s.hybrid, s.hidden_size
    parts = _attention_parts(s, ratio)
    parts["fp8"] += s.num_shared_experts * s.expert_params()
    parts["bf16"] += 2 * h + s.num_experts * h             # attn/ffn norms, gate weight
    parts["f32"] += 2 * (v.hc_mix * v.hc_mult * h + v.hc_mix + 3)   # hc_attn_*, hc_ffn_*
    if hash_gate:
        parts["i64"] = s.vocab_size * s.experts_per_token  # tid2eid: token id -> experts
    else:
        parts["f32"] += s.num_experts                      # e_score_correction bias
    return parts


def _top_parts(s: ModelShape) -> dict[str, int]:
    """Embedding, head, final norm and the output hyper-connection."""
    v, h = s.hybrid, s.hidden_size
    return {"bf16": 2 * s.vocab_size * h + h, "f32": v.hc_mult * v.hc_mult * h + v.hc_mult + 1}


def _mtp_parts(s: ModelShape) -> dict[str, int]:
    """One multi-token-prediction layer (shares embedding and head with the main model)."""
    v, h = s.hybrid, s.hidden_size
    parts = _block_parts(s, v.mtp_compress_ratio, hash_gate=False)
    parts["fp8"] += 2 * h * h                              # e_proj, h_proj
    parts["bf16"] += 3 * h                                 # enorm, hnorm, norm
    parts["f32"] += v.hc_mult * v.hc_mult * h + v.hc_mult + 1
    return parts


def _main_parts(s: ModelShape) -> dict[str, int]:
    total: dict[str, int] = {}
    for i, ratio in enumerate(s.hybrid.compress_ratios):
        for k, n in _block_parts(s, ratio, i < s.hybrid.num_hash_layers).items():
            total[k] = total.get(k, 0) + n
    for k, n in _top_parts(s).items():
        total[k] = total.get(k, 0) + n
    return total


def non_expert_params(s: ModelShape) -> int:
    """Main-model parameters outside the routed experts (hash tables are not parameters)."""
    p = _main_parts(s)
    return p["fp8"] + p["bf16"] + p["f32"]


def mtp_params(s: ModelShape) -> int:
    p = _mtp_parts(s)
    return (p["fp8"] + p["bf16"] + p["f32"] + s.num_experts * s.expert_params()) \
        * s.hybrid.num_mtp_layers


# -- bytes ---------------------------------------------------------------------------------------
def _fp8_bytes(n: int) -> float:
    return n * (1 + 1 / (FP8_BLOCK * FP8_BLOCK))


def _routed_bytes(n: int, dtype: str) -> float:
    if dtype == "fp4":
        return n * (0.5 + 1 / FP4_GROUP)
    return _fp8_bytes(n) if dtype == "fp8" else 2.0 * n


def _parts_bytes(p: dict[str, int], dense_dtype: str) -> float:
    dense = _fp8_bytes(p["fp8"]) if dense_dtype == "fp8" else 2.0 * p["fp8"]
    return dense + 2.0 * p["bf16"] + 4.0 * p["f32"] + 8.0 * p.get("i64", 0)


def weight_bytes(s: ModelShape, dtype: str) -> dict[str, float]:
    """Bytes of the main model as vLLM loads it (MTP only loads with speculative decoding).

    ``dtype`` ``fp8`` is the checkpoint as shipped (fp8 dense, ``expert_dtype`` experts);
    ``bf16`` is everything dequantized. ``replicated``: compressors, indexers and
    hyper-connections, which vLLM keeps whole on every tensor-parallel rank.
    """
    v = s.hybrid
    main = _main_parts(s)
    replicated = 0.0
    for ratio in v.compress_ratios:
        if ratio > 1:
            replicated += 2.0 * sum(_compressor(s.hidden_size, s.head_dim, ratio))
        if ratio == 4:
            bf16, f32 = _compressor(s.hidden_size, v.index_head_dim, ratio)
            idx_q = v.q_lora_rank * v.index_n_heads * v.index_head_dim
            replicated += (2.0 * (bf16 + f32 + s.hidden_size * v.index_n_heads)
                           + (_fp8_bytes(idx_q) if dtype == "fp8" else 2.0 * idx_q))
    replicated += 4.0 * 2 * (v.hc_mix * v.hc_mult * s.hidden_size + v.hc_mix + 3) * s.num_layers
    embedding = 2.0 * 2 * s.vocab_size * s.hidden_size
    body = _parts_bytes(main, dtype) - embedding - replicated
    routed_dtype = (s.expert_dtype or "fp8") if dtype == "fp8" else "bf16"
    return {"sharded": body, "replicated": replicated, "embedding": embedding,
            "routed": _routed_bytes(s.routed_expert_params(), routed_dtype)}


def checkpoint_bytes(s: ModelShape) -> float:
    """Bytes of the published safetensors: the main model plus its MTP layer(s), as shipped."""
    mtp = _mtp_parts(s)
    mtp_bytes = (_parts_bytes(mtp, "fp8") + _routed_bytes(s.num_experts * s.expert_params(),
                                                          s.expert_dtype or "fp8")) \
        * s.hybrid.num_mtp_layers
    return sum(weight_bytes(s, "fp8").values()) + mtp_bytes


def safetensors_elements(s: ModelShape) -> float:
    """Element count Hugging Face shows as "params" for the checkpoint: fp4 experts are stored
    two per int8 element, and every scale, hash table and MTP tensor is an element too."""
    routed = s.routed_expert_params() + s.num_experts * s.expert_params() * \
        s.hybrid.num_mtp_layers
    fp4 = routed / 2 + routed / FP4_GROUP if s.expert_dtype == "fp4" else routed
    total = 0.0
    for p in (_main_parts(s), *[_mtp_parts(s)] * s.hybrid.num_mtp_layers):
        total += p["fp8"] * (1 + 1 / (FP8_BLOCK * FP8_BLOCK)) + p["bf16"] + p["f32"] \
            + p.get("i64", 0)
    return total + fp4


# -- KV cache ------------------------------------------------------------------------------------
def _page(entries: int, entry_bytes: int) -> int:
    """Bytes of one page of ``entries`` entries, padded to the FlashMLA stride."""
    raw = entries * entry_bytes
    return -(-raw // KV_PAGE_ALIGN_BYTES) * KV_PAGE_ALIGN_BYTES


def _indexer_entry_bytes(v: HybridAttention) -> int:
    return v.index_head_dim + v.index_head_dim // FP8_BLOCK * 4


def kv_bytes_per_token(v: HybridAttention, ratios: tuple[int, ...]) -> float:
    """KV bytes one more token of context adds, summed over the layers in ``ratios``.

    The compressed caches grow one entry per ``ratio`` tokens; the sliding window does not grow.
    """
    total = 0.0
    for r in ratios:
        if r > 1:
            total += _page(KV_BLOCK_TOKENS // r, KV_ENTRY_BYTES) / KV_BLOCK_TOKENS
        if r == 4:
            total += _page(KV_BLOCK_TOKENS // r, _indexer_entry_bytes(v)) / KV_BLOCK_TOKENS
    return total


def kv_bytes_per_sequence(v: HybridAttention, ratios: tuple[int, ...], head_dim: int) -> int:
    """Fixed bytes every running sequence holds, whatever its length: the sliding-window
    blocks of every layer and the compressors' fp32 pooling state."""
    swa_blocks = -(-v.sliding_window // SWA_BLOCK_TOKENS) + 1
    total = len(ratios) * swa_blocks * _page(SWA_BLOCK_TOKENS, KV_ENTRY_BYTES)
    for r in ratios:
        if r > 1:
            total += _compressor_state_bytes(r, head_dim)
        if r == 4:
            total += _compressor_state_bytes(r, v.index_head_dim)
    return total


def _compressor_state_bytes(ratio: int, dim: int) -> int:
    coff = 2 if ratio == 4 else 1
    slot_bytes = 2 * coff * dim * 4                 # kv state + score state, fp32
    block = 4 if ratio == 4 else 8
    blocks = -(-(coff * ratio) // block) + 1
    return blocks * _page(block, slot_bytes)


def kv_read_bytes(v: HybridAttention, ratios: tuple[int, ...], context: float) -> float:
    """KV bytes one decode step of one sequence reads at ``context`` tokens: the window in every
    layer, the indexer keys and the top-k selected entries in ratio-4 layers, every entry in
    ratio-128 layers."""
    total = 0.0
    for r in ratios:
        total += min(context, v.sliding_window) * KV_ENTRY_BYTES
        if r == 4:
            entries = context / 4
            total += min(v.index_topk, entries) * KV_ENTRY_BYTES
            total += entries * _indexer_entry_bytes(v)
        elif r > 1:
            total += context / r * KV_ENTRY_BYTES
    return total


def attention_flops_per_token(s: ModelShape, ratios: tuple[int, ...], context: float) -> float:
    """Attention FLOPs of one decoded token: scores and values over the entries it reads (the
    512-wide latent is both K and V), plus the indexer's scores over every ratio-4 entry."""
    v = s.hybrid
    per_entry = 2 * s.num_attention_heads * 2 * s.head_dim
    total = 0.0
    for r in ratios:
        entries = min(context, v.sliding_window)
        if r == 4:
            entries += min(v.index_topk, context / 4)
            total += 2 * v.index_n_heads * v.index_head_dim * context / 4
        elif r > 1:
            entries += context / r
        total += entries * per_entry
    return total


def stage_ratios(v: HybridAttention, pipeline_parallel_size: int) -> tuple[int, ...]:
    """Compress ratios of the pipeline stage with the largest KV cache (vLLM splits layers into
    contiguous stages of at most ceil(layers / PP))."""
    n = math.ceil(len(v.compress_ratios) / pipeline_parallel_size)
    stages = [v.compress_ratios[i:i + n] for i in range(0, len(v.compress_ratios), n)]
    return max(stages, key=lambda rs: (kv_bytes_per_token(v, rs), len(rs)))
