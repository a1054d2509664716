"""Random weights for a tiny ``DeepseekV4ForCausalLM`` checkpoint (used by ``engine.tiny``).

transformers has no ``save_pretrained`` path that writes the DeepSeek-native tensor names vLLM's
V4 loader reads (``vllm/models/deepseek_v4/cpu/model.py``: ``embed.weight``, ``head.weight``,
``layers.{i}.attn.wq_a`` ...), so this module writes them itself, one tensor at a time from a
seeded generator: the same seed always gives the same bytes.

The shape covers every V4 layer kind at the smallest size vLLM's CPU kernels accept
(head_dim 512, qk_rope_head_dim 64, index_head_dim 128, index_topk 512, 64 routed experts,
top-6, compress ratios 0, 4 and 128):

- layer 0: sliding-window only (ratio 0), hash-routed MoE (``ffn.gate.tid2eid``);
- layer 1: ratio-4 compressed attention with the sparse indexer, scored (``noaux_tc``) routing;
- layer 2: ratio-128 compressed attention, scored routing;

every layer has hyper-connections (``hc_mult`` 4, 20 Sinkhorn iterations) and one shared
expert. Weights are bf16 (no quantization config), the hyper-connection, sink and compressor
position tensors f32 as the loader declares them.

Three layers, one of each kind, in V4-Flash's order (its 43 layers are ``[0, 0] + [4, 128] * 20
+ [4, 0]``, the first 3 hash-routed): as deep as the tiny DeepSeek-V3 (3 layers), so that
comparing the two compares the architectures at the same depth. A fourth layer would repeat a
kind (V4-Flash's second sliding-window, hash-routed layer) and add a third to the per-token cost.
"""

from __future__ import annotations

import json
from pathlib import Path

COMPRESS_RATIOS = (0, 4, 128)
NUM_HASH_LAYERS = 1

_SHAPE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=512,
    qk_rope_head_dim=64, q_lora_rank=64, o_lora_rank=64, o_groups=2,
    n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, moe_intermediate_size=32,
    index_n_heads=4, index_head_dim=128, index_topk=512, sliding_window=128, hc_mult=4,
)


def v4_config(vocab_size: int, max_position_embeddings: int, ids: dict[str, int]) -> dict:
    """``config.json`` of the tiny V4, in the key layout of the published V4-Flash config."""
    return dict(
        architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4",
        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
        num_hidden_layers=len(COMPRESS_RATIOS), compress_ratios=list(COMPRESS_RATIOS),
        num_hash_layers=NUM_HASH_LAYERS, **_SHAPE,
        scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True,
        routed_scaling_factor=1.5, swiglu_limit=10.0, hidden_act="silu",
        hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        # YaRN as in V4-Flash, scaled down: the compressed layers' rotary cache grows with
        # original_max_position_embeddings x factor, so both stay small.
        rope_scaling=dict(type="yarn", rope_type="yarn", factor=2.0,
                          original_max_position_embeddings=max_position_embeddings // 2,
                          beta_fast=32, beta_slow=1),
        num_nextn_predict_layers=0, expert_dtype="bf16", tie_word_embeddings=False,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        torch_dtype="bfloat16", dtype="bfloat16",
    )


def v4_tensors(config: dict, seed: int, zero_logit_ids: set[int]) -> dict:
    """All checkpoint tensors, by DeepSeek-native name, drawn from a generator seeded ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    bf16, f32 = torch.bfloat16, torch.float32
    h, vocab = config["hidden_size"], config["vocab_size"]
    hd, heads, groups = config["head_dim"], config["num_attention_heads"], config["o_groups"]
    q_rank, o_rank = config["q_lora_rank"], config["o_lora_rank"]
    experts, inter = config["n_routed_experts"], config["moe_intermediate_size"]
    hc = config["hc_mult"]
    mix_hc = (2 + hc) * hc
    out: dict[str, torch.Tensor] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[name] = (torch.randn(n_out, n_in, generator=gen) * n_in ** -0.5).to(bf16)

    def ones(name: str, n: int) -> None:
        out[name] = torch.ones(n, dtype=bf16)

    def small(name: str, *shape: int) -> None:
        out[name] = torch.randn(*shape, generator=gen).mul_(0.02).to(f32)

    def compressor(prefix: str, ratio: int, dim: int) -> None:
        coff = 2 if ratio == 4 else 1  # ratio-4 compressors overlap two windows
        small(f"{prefix}.ape", ratio, coff * dim)
        linear(f"{prefix}.wkv.weight", coff * dim, h)
        linear(f"{prefix}.wgate.weight", coff * dim, h)
        ones(f"{prefix}.norm.weight", dim)

    linear("embed.weight", vocab, h)
    for layer, ratio in enumerate(config["compress_ratios"]):
        p = f"layers.{layer}"
        ones(f"{p}.attn_norm.weight", h)
        ones(f"{p}.ffn_norm.weight", h)
        for kind in ("attn", "ffn"):
            small(f"{p}.hc_{kind}_fn", mix_hc, hc * h)
            small(f"{p}.hc_{kind}_base", mix_hc)
            out[f"{p}.hc_{kind}_scale"] = torch.ones(3, dtype=f32)
        out[f"{p}.attn.attn_sink"] = torch.zeros(heads, dtype=f32)
        linear(f"{p}.attn.wq_a.weight", q_rank, h)
        ones(f"{p}.attn.q_norm.weight", q_rank)
        linear(f"{p}.attn.wq_b.weight", heads * hd, q_rank)
        linear(f"{p}.attn.wkv.weight", hd, h)
        ones(f"{p}.attn.kv_norm.weight", hd)
        linear(f"{p}.attn.wo_a.weight", groups * o_rank, heads * hd // groups)
        linear(f"{p}.attn.wo_b.weight", h, groups * o_rank)
        if ratio > 1:
            compressor(f"{p}.attn.compressor", ratio, hd)
        if ratio == 4:
            idx_heads, idx_dim = config["index_n_heads"], config["index_head_dim"]
            linear(f"{p}.attn.indexer.wq_b.weight", idx_heads * idx_dim, q_rank)
            linear(f"{p}.attn.indexer.weights_proj.weight", idx_heads, h)
            compressor(f"{p}.attn.indexer.compressor", ratio, idx_dim)
        linear(f"{p}.ffn.gate.weight", experts, h)
        if layer < config["num_hash_layers"]:
            out[f"{p}.ffn.gate.tid2eid"] = _hash_table(gen, vocab, experts,
                                                       config["num_experts_per_tok"])
        else:
            small(f"{p}.ffn.gate.bias", experts)
        for e in range(experts):
            linear(f"{p}.ffn.experts.{e}.w1.weight", inter, h)
            linear(f"{p}.ffn.experts.{e}.w2.weight", h, inter)
            linear(f"{p}.ffn.experts.{e}.w3.weight", inter, h)
        shared = inter * config["n_shared_experts"]
        linear(f"{p}.ffn.shared_experts.w1.weight", shared, h)
        linear(f"{p}.ffn.shared_experts.w2.weight", h, shared)
        linear(f"{p}.ffn.shared_experts.w3.weight", shared, h)
    ones("norm.weight", h)
    small("hc_head_fn", hc, hc * h)
    small("hc_head_base", hc)
    out["hc_head_scale"] = torch.ones(1, dtype=f32)
    linear("head.weight", vocab, h)
    # Random weights would often pick a special token, which detokenizes to nothing: give the
    # non-EOS specials zero logits so that outputs are visible text.
    for token_id in sorted(zero_logit_ids):
        out["head.weight"][token_id].zero_()
    return out


def _hash_table(gen, vocab: int, experts: int, top_k: int):
    """``tid2eid``: for each token id, ``top_k`` distinct experts (a frozen random hash)."""
    import torch

    scores = torch.rand(vocab, experts, generator=gen)
    return scores.topk(top_k, dim=-1).indices.to(torch.int32)


def write_v4_checkpoint(out: Path, vocab_size: int, max_position_embeddings: int,
                        ids: dict[str, int], seed: int, zero_logit_ids: set[int]) -> int:
    """Write ``config.json`` and ``model.safetensors`` into ``out``; return the parameter count."""
    from safetensors.torch import save_file

    config = v4_config(vocab_size, max_position_embeddings, ids)
    tensors = v4_tensors(config, seed, zero_logit_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for name, t in tensors.items() if not name.endswith("tid2eid"))
