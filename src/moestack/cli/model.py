"""``moestack model``: build tiny random-weight checkpoints and random LoRA adapters for them."""

from __future__ import annotations

import sys
from pathlib import Path

from moestack.adapters import AdapterSpec, build_adapter, inspect_adapter
from moestack.engine.tiny import TINY_ARCHS, TinySpec, build_tiny_model
from moestack.errors import InvalidAdapterError


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="model checkpoints")
    sub = model.add_subparsers(dest="model_command", required=True)
    p = sub.add_parser("build-tiny", help="build a tiny random-weight checkpoint (MoE, or a "
                       "dense llama for LoRA on CPU) with a locally trained tokenizer and a chat "
                       "template")
    p.add_argument("--arch", choices=TINY_ARCHS, required=True)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_build_tiny)

    a = sub.add_parser("build-adapter", help="build a random-weight PEFT LoRA adapter "
                       "(adapter_config.json + adapter_model.safetensors) for a checkpoint")
    a.add_argument("--base", required=True, type=Path, help="base checkpoint folder (its "
                   "config.json gives the layers and shapes)")
    a.add_argument("--out", required=True, type=Path, help="output folder")
    a.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r")
    a.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (scaling alpha/r)")
    a.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, "
                   "e.g. q_proj,k_proj,v_proj,o_proj")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--base-model-name", default=None, help="base_model_name_or_path to write "
                   "(default: the base folder's name)")
    a.set_defaults(func=run_build_adapter)


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def run_build_tiny(args) -> int:
    build_tiny_model(TinySpec(args.arch, args.seed), args.out, progress=lambda m: print(m,
                     flush=True))
    return 0


def run_build_adapter(args) -> int:
    import json

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    spec = AdapterSpec(rank=args.rank, alpha=args.alpha, targets=targets, seed=args.seed,
                       base_model_name=args.base_model_name)
    try:
        out = build_adapter(args.base, args.out, spec)
        info = inspect_adapter(out, json.loads((args.base / "config.json").read_text()),
                               args.rank)
    except InvalidAdapterError as exc:
        print(f"moestack: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a rank-{info.rank} LoRA adapter for {', '.join(info.target_modules)} to {out} "
          f"({info.size_bytes} bytes, sha256 {info.content_sha256})", flush=True)
    return 0
