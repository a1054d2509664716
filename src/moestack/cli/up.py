"""``moestack up``: start the local stack and serve until Ctrl-C."""

from __future__ import annotations

from moestack.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("up", help="start Ray, deploy the models and the gateway, serve "
                              "until Ctrl-C")
    p.add_argument("--config", "-c", help="config YAML (default: the embedded local default)")
    p.add_argument("--verbose", "-v", action="store_true", help="show Ray and vLLM logs")
    p.set_defaults(func=run)


def run(args) -> int:
    from moestack.serve.local import up

    config = load_config(args.config)
    return up(config, say=lambda m: print(m, flush=True), verbose=args.verbose)
