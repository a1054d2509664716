"""The ``moestack`` command line: each sub-command registers itself from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from moestack.errors import ConfigError

COMMAND_MODULES = ("moestack.cli.up", "moestack.cli.model", "moestack.cli.config_cmd",
                   "moestack.cli.loadtest", "moestack.cli.plan", "moestack.cli.k8s",
                   "moestack.cli.tenants", "moestack.cli.usage", "moestack.cli.cost",
                   "moestack.cli.adapters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moestack", description="Serve open-weight MoE models "
                                     "as a multi-tenant OpenAI-compatible API.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"moestack: {exc}", file=sys.stderr)
        return 2
