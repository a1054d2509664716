"""``moestack config check|show``: validate a config, or print it with defaults filled in."""

from __future__ import annotations

import yaml

from moestack.config import embedded_default_path, load_config


def register(subparsers) -> None:
    cfg = subparsers.add_parser("config", help="configuration files")
    sub = cfg.add_subparsers(dest="config_command", required=True)
    for name, helptext in (("check", "validate a config file"),
                           ("show", "print the config with every default filled in")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("path", nargs="?", help=f"default: {embedded_default_path().name} "
                       "(embedded)")
        p.set_defaults(func=run, action=name)


def run(args) -> int:
    config = load_config(args.path)
    if args.action == "show":
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    else:
        print(f"ok: {len(config.models)} model(s): {', '.join(m.name for m in config.models)}")
    return 0
