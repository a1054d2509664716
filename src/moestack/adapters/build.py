"""Builder of random-weight PEFT LoRA adapters for a (tiny) base checkpoint.

No fine-tuned adapters can be downloaded where moestack is tested, so adapters are built from
the base's ``config.json``: ``adapter_config.json`` as PEFT writes it, and
``adapter_model.safetensors`` with PEFT's tensor names and shapes
(:mod:`moestack.adapters.shapes`). Unlike a freshly initialised PEFT adapter, whose ``lora_B``
is zero, both matrices are random, so the adapter changes what the model generates. The same
arguments always give byte-identical files. Only torch and safetensors are used (no peft).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moestack.adapters.inspection import CONFIG_FILE, WEIGHTS_FILE
from moestack.adapters.shapes import base_shape, tensor_name
from moestack.engine.tiny import staged_dir
from moestack.errors import InvalidAdapterError

B_STD = 0.05
"""Standard deviation of ``lora_B``; ``lora_A`` is scaled like a Kaiming init (1/sqrt(in)),
so that the adapter's update is of the order of the random base weights (std 0.02)."""


@dataclass(frozen=True)
class AdapterSpec:
    """What a random adapter is built from."""

    rank: int = 8
    alpha: float = 16
    targets: Sequence[str] = ("q_proj", "v_proj")
    seed: int = 0
    base_model_name: str | None = None
    """``base_model_name_or_path`` to write; unset: the base checkpoint folder's name."""


def build_adapter(base: Path, out_dir: Path, spec: AdapterSpec = AdapterSpec()) -> Path:
    """Write a random adapter for the checkpoint in ``base`` into ``out_dir`` (atomically)."""
    import torch
    from safetensors.torch import save_file

    base = Path(base)
    try:
        base_config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{base} is not a Hugging Face checkpoint: {exc}",
                                  param="base") from None
    shape = base_shape(base_config)
    targets = list(dict.fromkeys(spec.targets))
    if unknown := [t for t in targets if t not in shape.projections]:
        raise InvalidAdapterError(f"target module(s) {', '.join(unknown)} are not adaptable "
                                  f"modules of {shape.architecture} (it has: "
                                  f"{', '.join(shape.projections)})", param="targets")
    if not targets or spec.rank < 1 or spec.alpha <= 0:
        raise InvalidAdapterError("an adapter needs targets, a positive rank and alpha")
    generator = torch.Generator().manual_seed(spec.seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for target in targets:
            proj = shape.projections[target]
            a = torch.randn(spec.rank, proj.in_features, generator=generator)
            b = torch.randn(proj.out_features, spec.rank, generator=generator)
            tensors[tensor_name(layer, proj, "A")] = (a / math.sqrt(proj.in_features)).contiguous()
            tensors[tensor_name(layer, proj, "B")] = (b * B_STD).contiguous()
    config = {
        "alpha_pattern": {}, "auto_mapping": None,
        "base_model_name_or_path": spec.base_model_name or base.resolve().name,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha,
        "lora_dropout": 0.0, "modules_to_save": None,
        "peft_type": "LORA", "r": spec.rank, "rank_pattern": {}, "revision": None,
        "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": False,
    }
    out_dir = Path(out_dir)
    with staged_dir(out_dir, ".adapter-") as staging:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        # Readable by the serving processes, which may run as another user (a shared volume).
        staging.chmod(0o755)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (staging / name).chmod(0o644)
    return out_dir
