"""Which linear layers of a base model a LoRA adapter may target, with their shapes.

Read from the base checkpoint's ``config.json`` alone (a dict), so adapters can be checked
without loading the model or an engine. Module names are the Hugging Face ones that PEFT writes
(``q_proj``, ``v_proj``, ...), not vLLM's fused ones (``qkv_proj``).

Known families:

* standard attention (Llama, Mistral, Qwen, Mixtral, ...): ``q_proj``, ``k_proj``, ``v_proj``,
  ``o_proj`` under ``self_attn``; a dense model also has ``gate_proj``, ``up_proj``,
  ``down_proj`` under ``mlp``;
* multi-head latent attention (DeepSeek-V2/V3): ``q_proj`` (or ``q_a_proj`` + ``q_b_proj`` with
  a query LoRA rank), ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj`` under ``self_attn``.

Expert (MoE) layers are not listed: their LoRA layout differs by engine and version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moestack.errors import InvalidAdapterError

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_UNSUPPORTED_MODEL_TYPES = frozenset({"deepseek_v4"})
"""Bases whose checkpoints do not use Hugging Face module names (DeepSeek-V4's native layout)."""


@dataclass(frozen=True)
class Projection:
    """One adaptable linear layer of every decoder layer."""

    path: str
    """Its path inside a decoder layer, e.g. ``self_attn.q_proj``."""
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must fit: decoder layers and the adaptable projections of each."""

    architecture: str
    num_layers: int
    projections: Mapping[str, Projection]
    """Module name (as PEFT names it in ``target_modules``) -> projection."""


def base_shape(config: Mapping[str, Any]) -> BaseShape:
    """The adaptable shape of a base checkpoint from its ``config.json``; raises
    :class:`InvalidAdapterError` for a base whose layout is not known here."""
    arch = (config.get("architectures") or [config.get("model_type") or "unknown"])[0]
    if config.get("model_type") in _UNSUPPORTED_MODEL_TYPES:
        raise InvalidAdapterError(f"LoRA adapters are not supported on {arch} bases: its "
                                  "checkpoint does not use Hugging Face module names")
    try:
        hidden = _int(config, "hidden_size")
        layers = _int(config, "num_hidden_layers")
        heads = _int(config, "num_attention_heads")
        if config.get("kv_lora_rank"):
            projections = _mla_projections(config, hidden, heads)
        else:
            projections = _attention_projections(config, hidden, heads)
            if not any(config.get(k) for k in _EXPERT_KEYS):
                inter = _int(config, "intermediate_size")
                projections |= {
                    "gate_proj": Projection("mlp.gate_proj", hidden, inter),
                    "up_proj": Projection("mlp.up_proj", hidden, inter),
                    "down_proj": Projection("mlp.down_proj", inter, hidden),
                }
    except _MissingField as exc:
        raise InvalidAdapterError(f"the base model's config.json ({arch}) has no valid "
                                  f"`{exc.args[0]}`, which LoRA shapes are checked against"
                                  ) from None
    return BaseShape(arch, layers, projections)


class _MissingField(Exception):
    pass


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _MissingField(key)
    return value


def _attention_projections(config: Mapping[str, Any], hidden: int,
                           heads: int) -> dict[str, Projection]:
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return {
        "q_proj": Projection("self_attn.q_proj", hidden, heads * head_dim),
        "k_proj": Projection("self_attn.k_proj", hidden, kv_heads * head_dim),
        "v_proj": Projection("self_attn.v_proj", hidden, kv_heads * head_dim),
        "o_proj": Projection("self_attn.o_proj", heads * head_dim, hidden),
    }


def _mla_projections(config: Mapping[str, Any], hidden: int,
                     heads: int) -> dict[str, Projection]:
    nope, rope = _int(config, "qk_nope_head_dim"), _int(config, "qk_rope_head_dim")
    v_dim, kv_rank = _int(config, "v_head_dim"), _int(config, "kv_lora_rank")
    q_out = heads * (nope + rope)
    if config.get("q_lora_rank"):
        q_rank = _int(config, "q_lora_rank")
        query = {"q_a_proj": Projection("self_attn.q_a_proj", hidden, q_rank),
                 "q_b_proj": Projection("self_attn.q_b_proj", q_rank, q_out)}
    else:
        query = {"q_proj": Projection("self_attn.q_proj", hidden, q_out)}
    return query | {
        "kv_a_proj_with_mqa": Projection("self_attn.kv_a_proj_with_mqa", hidden, kv_rank + rope),
        "kv_b_proj": Projection("self_attn.kv_b_proj", kv_rank, heads * (nope + v_dim)),
        "o_proj": Projection("self_attn.o_proj", heads * v_dim, hidden),
    }


def tensor_name(layer: int, projection: Projection, part: str) -> str:
    """PEFT's name of a LoRA tensor: ``part`` is ``A`` or ``B``."""
    return f"base_model.model.model.layers.{layer}.{projection.path}.lora_{part}.weight"
