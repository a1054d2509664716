"""``moestack model build-tiny``: build a tiny random-weight MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

from moestack.engine.tiny import TINY_ARCHS, TinySpec, build_tiny_model


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="model checkpoints")
    sub = model.add_subparsers(dest="model_command", required=True)
    p = sub.add_parser("build-tiny", help="build a tiny random-weight MoE checkpoint with a "
                       "locally trained tokenizer and a chat template")
    p.add_argument("--arch", choices=TINY_ARCHS, required=True)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_build_tiny)


def run_build_tiny(args) -> int:
    build_tiny_model(TinySpec(args.arch, args.seed), args.out, progress=lambda m: print(m,
                     flush=True))
    return 0
