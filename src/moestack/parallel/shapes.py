"""Shapes of Mixture-of-Experts models: the figures the layout planner needs.

A :class:`ModelShape` holds what decides memory, KV cache and bandwidth: layer and expert counts,
hidden sizes, attention kind (MLA or grouped-query) and the dtype the checkpoint ships in.
Parameter counts are computed from the shape (not typed in), so the catalog entries are checked
against the publishers' own totals in the tests. Shapes come from the built-in catalog
(:data:`SHAPES`, figures copied from each model's Hugging Face ``config.json``) or from a local
checkpoint's ``config.json`` (:func:`shape_from_hf_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from moestack.errors import ConfigError
from moestack.parallel import deepseek_v4
from moestack.parallel.deepseek_v4 import HybridAttention

WeightDtype = Literal["bf16", "fp8"]
BYTES_PER_PARAM: dict[str, float] = {"bf16": 2.0, "fp8": 1.0}


@dataclass(frozen=True)
class ModelShape:
    """Architecture figures of one MoE model (names follow Hugging Face ``config.json``)."""

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_dense_layers: int          # leading layers with a dense MLP instead of experts
    dense_intermediate_size: int   # MLP width of the dense layers
    num_experts: int               # routed experts per MoE layer
    experts_per_token: int         # top-k
    num_shared_experts: float      # Qwen2-MoE: shared width in units of one routed expert
    moe_intermediate_size: int     # MLP width of one routed (and shared) expert
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int                  # GQA head size (v head size for MLA)
    q_lora_rank: int | None = None  # MLA: set for DeepSeek-V2/V3-style attention
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    tie_word_embeddings: bool = False
    router_bias: bool = False      # DeepSeek-V3 noaux_tc routing: a per-expert score bias
    max_context_tokens: int = 32768
    checkpoint_dtype: WeightDtype = "bf16"
    expert_dtype: Literal["fp4", "fp8", "bf16"] | None = None  # routed experts, if not as above
    hybrid: HybridAttention | None = None  # DeepSeek-V4 attention (moestack.parallel.deepseek_v4)
    api_baseline: str | None = None  # pricing-catalog baseline serving this model as an API
    source: str = ""

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    # -- parameter counts -------------------------------------------------------------------
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            qk = (self.qk_nope_head_dim or 0) + (self.qk_rope_head_dim or 0)
            heads = self.num_attention_heads
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * qk
                 if self.q_lora_rank else h * heads * qk)
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * heads * ((self.qk_nope_head_dim or 0) + self.head_dim))
            return q + kv + heads * self.head_dim * h
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return h * q_out + 2 * h * kv_out + q_out * h

    def expert_params(self) -> int:
        """Parameters of one expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def routed_expert_params_per_layer(self) -> int:
        return self.num_experts * self.expert_params()

    def embedding_params(self) -> int:
        """Input embedding plus the output head (once when they are tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def non_expert_params(self) -> int:
        """Everything that is not a routed expert: attention, dense MLPs, shared experts,
        routers, norms and embeddings (replicated or tensor-sharded, never expert-sharded)."""
        if self.hybrid is not None:
            return deepseek_v4.non_expert_params(self)
        h = self.hidden_size
        per_moe_layer = (self.num_shared_experts * self.expert_params()
                         + self.num_experts * (h + self.router_bias))  # router
        dense_mlp = 3 * h * self.dense_intermediate_size
        return (self.num_layers * (self.attention_params_per_layer() + 2 * h)
                + self.num_dense_layers * dense_mlp + self.num_moe_layers * per_moe_layer
                + self.embedding_params() + h)

    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.routed_expert_params_per_layer()

    def total_params(self) -> int:
        return self.non_expert_params() + self.routed_expert_params()

    def active_params(self) -> int:
        """Parameters one token passes through (top-k routed experts in each MoE layer).

        DeepSeek counts V4's active parameters without the input embedding table (a token reads
        one row of it); earlier model cards count it, so only hybrid shapes leave it out."""
        lookup = self.vocab_size * self.hidden_size if self.hybrid is not None else 0
        return (self.non_expert_params() - lookup
                + self.num_moe_layers * self.experts_per_token * self.expert_params())

    def weight_bytes(self, dtype: str) -> dict[str, float]:
        """Bytes of the loaded weights in ``dtype`` by how layouts split them: ``sharded``
        (split by TP), ``replicated`` (whole on every TP rank), ``embedding`` (embedding and
        head, bf16, split by TP) and ``routed`` (split over the expert group)."""
        if self.hybrid is not None:
            return deepseek_v4.weight_bytes(self, dtype)
        wb = BYTES_PER_PARAM[dtype]
        embed = self.embedding_params()
        return {"sharded": (self.non_expert_params() - embed) * wb, "replicated": 0.0,
                "embedding": embed * 2.0, "routed": self.routed_expert_params() * wb}

    # -- KV cache -------------------------------------------------------------------------
    def kv_elements_per_token_per_layer(self, tensor_parallel_size: int = 1) -> int:
        """KV-cache elements one token takes in one layer on one tensor-parallel rank.

        MLA caches one compressed latent (kv_lora_rank + rope dims) shared by all heads, and
        vLLM keeps the whole latent on every TP rank (it is not split). GQA caches K and V for
        each KV head; TP splits the heads, and a rank holds at least one (heads are replicated
        when TP exceeds them).
        """
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        heads_per_rank = max(1, -(-self.num_kv_heads // tensor_parallel_size))
        return 2 * heads_per_rank * self.head_dim


def shape_from_hf_config(path: str | Path, name: str | None = None) -> ModelShape:
    """Read a shape from a checkpoint folder (or its ``config.json``).

    Knows the field names of DeepSeek-V2/V3 (MLA, ``n_routed_experts``), Mixtral
    (``num_local_experts``) and Qwen2/Qwen3-MoE (``num_experts``,
    ``shared_expert_intermediate_size``).
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a Hugging Face config from {file}: {exc}") from exc
    try:
        return _from_dict(cfg, name or file.parent.name, str(file))
    except KeyError as exc:
        raise ConfigError(f"{file}: not a Mixture-of-Experts config this planner knows "
                          f"(missing {exc.args[0]})") from None


def _hybrid_from_dict(cfg: dict) -> HybridAttention | None:
    """DeepSeek-V4's attention figures; ``compress_ratios`` lists the MTP layers last."""
    ratios = cfg.get("compress_ratios")
    if ratios is None:
        return None
    layers, mtp = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0)
    return HybridAttention(
        q_lora_rank=cfg["q_lora_rank"], o_lora_rank=cfg["o_lora_rank"],
        o_groups=cfg["o_groups"], rope_head_dim=cfg["qk_rope_head_dim"],
        sliding_window=cfg["sliding_window"], compress_ratios=tuple(ratios[:layers]),
        index_n_heads=cfg["index_n_heads"], index_head_dim=cfg["index_head_dim"],
        index_topk=cfg["index_topk"], hc_mult=cfg.get("hc_mult", 1),
        num_hash_layers=cfg.get("num_hash_layers", 0), num_mtp_layers=mtp,
        mtp_compress_ratio=ratios[layers] if len(ratios) > layers else 0)


def _from_dict(cfg: dict, name: str, source: str) -> ModelShape:
    g = cfg.get
    hybrid = _hybrid_from_dict(cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    num_experts = g("n_routed_experts") or g("num_local_experts") or cfg["num_experts"]
    moe_inter = g("moe_intermediate_size") or cfg["intermediate_size"]
    shared = g("n_shared_experts") or 0
    if not shared and g("shared_expert_intermediate_size"):  # Qwen2-MoE: one wide shared expert
        shared = cfg["shared_expert_intermediate_size"] / moe_inter
    dense = g("first_k_dense_replace") or len(g("mlp_only_layers") or [])
    mla = g("kv_lora_rank") is not None
    qc = g("quantization_config") or {}
    return ModelShape(
        name=name, architecture=(g("architectures") or ["unknown"])[0],
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["num_hidden_layers"],
        num_dense_layers=dense, dense_intermediate_size=g("intermediate_size") or moe_inter,
        num_experts=num_experts, experts_per_token=cfg["num_experts_per_tok"],
        num_shared_experts=shared, moe_intermediate_size=moe_inter, num_attention_heads=heads,
        num_kv_heads=g("num_key_value_heads") or heads,
        head_dim=(cfg["v_head_dim"] if mla else g("head_dim") or hidden // heads),
        q_lora_rank=g("q_lora_rank") if mla else None,
        kv_lora_rank=g("kv_lora_rank"), qk_nope_head_dim=g("qk_nope_head_dim") if mla else None,
        qk_rope_head_dim=g("qk_rope_head_dim") if mla else None,
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        router_bias=g("topk_method") == "noaux_tc",
        max_context_tokens=g("max_position_embeddings") or 32768,
        checkpoint_dtype="fp8" if qc.get("quant_method") == "fp8" else "bf16",
        expert_dtype=g("expert_dtype") if qc.get("quant_method") == "fp8" else None,
        hybrid=hybrid, source=source)


# Figures from each model's config.json on Hugging Face (linked in `source`); the tests check the
# computed totals against the parameter counts the publishers state.
_DEEPSEEK_V3 = ModelShape(
    name="deepseek-v3", architecture="DeepseekV3ForCausalLM", vocab_size=129280,
    hidden_size=7168, num_layers=61, num_dense_layers=3, dense_intermediate_size=18432,
    num_experts=256, experts_per_token=8, num_shared_experts=1, moe_intermediate_size=2048,
    num_attention_heads=128, num_kv_heads=128, head_dim=128, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, max_context_tokens=163840,
    router_bias=True,
    checkpoint_dtype="fp8",  # shipped as block-wise FP8 (671B main model, ~700 GB with MTP)
    source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json "
           "(671B total, 37B active per the model card)")

# DeepSeek-V4: values of the published config.json files. Flash: 43 layers, compress_ratios
# [0, 0] + [4, 128] x 20 + [4] (+ a trailing 0 for the MTP layer); Pro: 61 layers,
# [128, 128] + [4, 128] x 29 + [4] (+ 0). Flash 284B total / 13B active, Pro 1.6T / 49B per the
# model cards; both ship fp8 e4m3 (128 x 128 UE8M0-scaled blocks) with fp4 routed experts.
def _v4(name: str, *, hidden: int, layers: int, heads: int, q_lora: int, o_groups: int,
        experts: int, expert_width: int, index_topk: int, ratios: tuple[int, ...],
        source: str) -> ModelShape:
    return ModelShape(
        name=name, architecture="DeepseekV4ForCausalLM", vocab_size=129280, hidden_size=hidden,
        num_layers=layers, num_dense_layers=0, dense_intermediate_size=expert_width,
        num_experts=experts, experts_per_token=6, num_shared_experts=1,
        moe_intermediate_size=expert_width, num_attention_heads=heads, num_kv_heads=1,
        head_dim=512, router_bias=True, max_context_tokens=1048576, checkpoint_dtype="fp8",
        expert_dtype="fp4", api_baseline=name, source=source,
        hybrid=HybridAttention(
            q_lora_rank=q_lora, o_lora_rank=1024, o_groups=o_groups, rope_head_dim=64,
            sliding_window=128, compress_ratios=ratios, index_n_heads=64, index_head_dim=128,
            index_topk=index_topk, hc_mult=4, num_hash_layers=3, num_mtp_layers=1))


_V4_FLASH = _v4(
    "deepseek-v4-flash", hidden=4096, layers=43, heads=64, q_lora=1024, o_groups=8,
    experts=256, expert_width=2048, index_topk=512, ratios=(0, 0) + (4, 128) * 20 + (4,),
    source="https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash/blob/main/config.json "
           "(284B total, 13B active per the model card; ~160 GB of safetensors)")
_V4_PRO = _v4(
    "deepseek-v4-pro", hidden=7168, layers=61, heads=128, q_lora=1536, o_groups=16,
    experts=384, expert_width=3072, index_topk=1024, ratios=(128, 128) + (4, 128) * 29 + (4,),
    source="https://huggingface.co/deepseek-ai/DeepSeek-V4-Pro/blob/main/config.json "
           "(1.6T total, 49B active per the model card; 862B safetensors elements)")

SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    _DEEPSEEK_V3, _V4_FLASH, _V4_PRO,
    # R1 and V3.1 share V3's architecture and sizes.
    replace(_DEEPSEEK_V3, name="deepseek-r1",
            source="https://huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/config.json"),
    replace(_DEEPSEEK_V3, name="deepseek-v3.1",
            source="https://huggingface.co/deepseek-ai/DeepSeek-V3.1/blob/main/config.json"),
    # Kimi K2: the DeepSeek-V3 architecture scaled to 384 experts and 1T parameters.
    replace(_DEEPSEEK_V3, name="kimi-k2", vocab_size=163840, num_dense_layers=1,
            num_experts=384, num_attention_heads=64, max_context_tokens=131072,
            source="https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json "
                   "(1T total, 32B active per the model card)"),
    ModelShape(
        name="mixtral-8x7b", architecture="MixtralForCausalLM", vocab_size=32000,
        hidden_size=4096, num_layers=32, num_dense_layers=0, dense_intermediate_size=14336,
        num_experts=8, experts_per_token=2, num_shared_experts=0, moe_intermediate_size=14336,
        num_attention_heads=32, num_kv_heads=8, head_dim=128, max_context_tokens=32768,
        source="https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json "
               "(46.7B total, 12.9B active per the model card)"),
    ModelShape(
        name="mixtral-8x22b", architecture="MixtralForCausalLM", vocab_size=32768,
        hidden_size=6144, num_layers=56, num_dense_layers=0, dense_intermediate_size=16384,
        num_experts=8, experts_per_token=2, num_shared_experts=0, moe_intermediate_size=16384,
        num_attention_heads=48, num_kv_heads=8, head_dim=128, max_context_tokens=65536,
        source="https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json "
               "(141B total, 39B active per the model card)"),
    ModelShape(
        name="qwen3-30b-a3b", architecture="Qwen3MoeForCausalLM", vocab_size=151936,
        hidden_size=2048, num_layers=48, num_dense_layers=0, dense_intermediate_size=6144,
        num_experts=128, experts_per_token=8, num_shared_experts=0, moe_intermediate_size=768,
        num_attention_heads=32, num_kv_heads=4, head_dim=128, max_context_tokens=40960,
        source="https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json "
               "(30.5B total, 3.3B active per the model card)"),
    ModelShape(
        name="qwen3-235b-a22b", architecture="Qwen3MoeForCausalLM", vocab_size=151936,
        hidden_size=4096, num_layers=94, num_dense_layers=0, dense_intermediate_size=12288,
        num_experts=128, experts_per_token=8, num_shared_experts=0, moe_intermediate_size=1536,
        num_attention_heads=64, num_kv_heads=4, head_dim=128, max_context_tokens=40960,
        source="https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json "
               "(235B total, 22B active per the model card)"),
)}


def get_shape(name_or_path: str | Path) -> ModelShape:
    """A catalog shape by name, or the shape of a local checkpoint folder / config.json."""
    key = str(name_or_path).lower()
    if key in SHAPES:
        return SHAPES[key]
    if Path(name_or_path).exists():
        return shape_from_hf_config(name_or_path)
    raise ConfigError(f"unknown model shape `{name_or_path}`: not a checkpoint folder and not "
                      f"in the catalog ({', '.join(sorted(SHAPES))})", param="shape")
