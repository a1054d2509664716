"""``moestack tenants create|list|set-limits|create-key|revoke-key``: manage tenants in the store.

Works on the database of the config (``storage.url``) or ``--db URL``, like the admin API; an API
key's plaintext is printed once, at creation, and never stored. ``create`` fills the settings not
given from the config's ``tenancy.new_tenant_defaults`` (``--models`` is required unless they name
models).
"""

from __future__ import annotations

import json
import sys

from moestack.config import load_config
from moestack.errors import MoestackError

argparse_unset = object()
"""Default of the limit flags: the flag was not given (``none`` clears a limit instead)."""

_FLAGS = (  # (flag, field, type, help)
    ("--models", "allowed_models", "list", "comma-separated model names, or * for all "
     "(create: required unless tenancy.new_tenant_defaults names models)"),
    ("--priority", "priority", int, "priority tier 0-9, 0 runs first"),
    ("--weight", "weight", float, "fair-share weight (tokens)"),
    ("--rpm", "requests_per_min", int, "requests per minute"),
    ("--tpm", "tokens_per_min", int, "tokens per minute (prompt + max completion reserved)"),
    ("--max-concurrent", "max_concurrent_requests", int, "requests in flight"),
    ("--budget-usd", "budget_usd", float, "USD per budget period"),
    ("--budget-period", "budget_period", str, "day, month or total"),
    ("--overflow", "overflow_policy", str, "never (default) or allowed: may requests go to "
     "an external provider when the cluster is full"),
    ("--overflow-budget-usd", "overflow_budget_usd", float, "USD per UTC month overflowed "
     "requests may cost at the providers"),
)


def _value(kind):
    def parse(text: str):
        if text.lower() == "none":
            return None
        if kind == "list":
            return [m.strip() for m in text.split(",") if m.strip()]
        return kind(text)
    return parse


def add_store_args(p) -> None:
    p.add_argument("--config", "-c", help="config YAML whose storage.url to use "
                   "(default: the embedded local default)")
    p.add_argument("--db", help="SQLAlchemy URL of the store (overrides the config)")


def open_store(args):
    from moestack.tenancy.store import TenancyStore

    url = args.db or load_config(args.config).storage.url
    return TenancyStore.open(url)


def with_store(args, command) -> int:
    """Run ``command(store)`` on the store ``args`` name: 0, or 1 with the error's message on
    stderr for a :class:`MoestackError` (opening the store included); the store is closed."""
    try:
        store = open_store(args)
    except MoestackError as exc:
        print(f"moestack: {exc.message}", file=sys.stderr)
        return 1
    try:
        command(store)
        return 0
    except MoestackError as exc:
        print(f"moestack: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()


def new_tenant_defaults(args) -> dict:
    """The config's ``tenancy.new_tenant_defaults`` as tenant settings."""
    return load_config(args.config).tenancy.new_tenant_defaults.settings()


def register(subparsers) -> None:
    p = subparsers.add_parser("tenants", help="manage tenants, limits and API keys")
    sub = p.add_subparsers(dest="tenants_command", required=True)
    create = sub.add_parser("create", help="create a tenant and print its first API key once")
    create.add_argument("name")
    setl = sub.add_parser("set-limits", help="change a tenant's limits (`none` clears one)")
    setl.add_argument("name")
    for cmd in (create, setl):
        for flag, field, kind, helptext in _FLAGS:
            cmd.add_argument(flag, dest=field, type=_value(kind), default=argparse_unset,
                             help=helptext)
    lst = sub.add_parser("list", help="list tenants with their limits and active key ids")
    lst.add_argument("--json", action="store_true", help="print JSON")
    key = sub.add_parser("create-key", help="add an API key to a tenant (printed once)")
    key.add_argument("name")
    key.add_argument("--label", help="what the key is for")
    revoke = sub.add_parser("revoke-key", help="revoke an API key by its id")
    revoke.add_argument("key_id")
    for cmd in (create, setl, lst, key, revoke):
        add_store_args(cmd)
        cmd.set_defaults(func=run)


def _limits(args) -> dict:
    """The settings given on the command line (the store checks them)."""
    return {field: getattr(args, field) for _, field, _, _ in _FLAGS
            if getattr(args, field) is not argparse_unset}


def _show(info) -> str:
    def lim(v):
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    return (f"{info.name}: models={','.join(info.allowed_models)} priority={info.priority} "
            f"weight={info.weight:g} rpm={lim(info.requests_per_min)} "
            f"tpm={lim(info.tokens_per_min)} concurrent={lim(info.max_concurrent_requests)} "
            f"budget={lim(info.budget_usd)} USD/{info.budget_period} "
            f"overflow={info.overflow_policy}/{lim(info.overflow_budget_usd)} USD/month "
            f"keys={','.join(info.active_key_ids) or '-'}")


def run(args) -> int:
    def command(store) -> None:
        cmd = args.tenants_command
        if cmd == "create":
            info, key = store.create_tenant(args.name, new_tenant_defaults(args),
                                            **_limits(args))
            print(_show(info))
            print(f"API key (shown once, store it now): {key.plaintext}")
        elif cmd == "set-limits":
            print(_show(store.set_limits(args.name, **_limits(args))))
        elif cmd == "list":
            tenants = store.list_tenants()
            if args.json:
                print(json.dumps([t.as_json() for t in tenants], indent=2))
            else:
                for t in tenants:
                    print(_show(t))
        elif cmd == "create-key":
            key = store.create_key(args.name, args.label)
            print(f"key id {key.key_id}")
            print(f"API key (shown once, store it now): {key.plaintext}")
        elif cmd == "revoke-key":
            store.revoke_key(args.key_id)
            print(f"revoked {args.key_id}")

    return with_store(args, command)
