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
    from moestack.serve.runner import STOP_TIMEOUT_S, exit_if_stuck, up

    config = load_config(args.config)
    say = lambda m: print(m, flush=True)  # noqa: E731
    code = up(config, say=say, verbose=args.verbose)
    # The interpreter's exit waits for threads: one that Ray or vLLM left behind must not keep
    # a stopped stack's process alive.
    exit_if_stuck(STOP_TIMEOUT_S, say)
    return code
