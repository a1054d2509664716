"""``moestack adapters add|list|remove``: the LoRA adapter registry, on the store of the config
(``storage.url``) or ``--db URL``, like ``moestack tenants``.

``add`` checks the adapter against its base model before registering it (the same checks as the
admin API: files, rank against ``max_lora_rank``, shapes, base model; exit 1 with the reason).
``remove`` takes it out of the registry: gateways answer 404 for it within
``tenancy.auth_cache_ttl_s``; replicas drop its weights as they evict it. The admin API's
``DELETE /admin/v1/adapters/<name>`` also unloads it from every replica at once.
"""

from __future__ import annotations

import json

from moestack.cli.tenants import add_store_args, with_store
from moestack.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("adapters", help="register, list and remove LoRA adapters")
    sub = p.add_subparsers(dest="adapters_command", required=True)
    add = sub.add_parser("add", help="check and register a LoRA adapter (PEFT directory)")
    add.add_argument("name", help="name clients send as `model`")
    add.add_argument("--base-model", "-m", required=True, help="configured model it runs on")
    add.add_argument("--path", required=True, help="adapter directory (adapter_config.json, "
                     "adapter_model.safetensors) as the replicas see it")
    add.add_argument("--owner", required=True, help="tenant that owns it")
    add.add_argument("--share-with", default="", help="comma-separated other tenants that may "
                     "use it (default: private to the owner)")
    add.add_argument("--usd-per-1m-tokens", type=float, help="its own price to tenants "
                     "(default: the base model's)")
    lst = sub.add_parser("list", help="list registered adapters")
    lst.add_argument("--tenant", "-t", help="only those this tenant may use")
    lst.add_argument("--json", action="store_true", help="print JSON")
    rm = sub.add_parser("remove", help="remove an adapter from the registry")
    rm.add_argument("name")
    for cmd in (add, lst, rm):
        add_store_args(cmd)
        cmd.set_defaults(func=run)


def _show(a) -> str:
    price = "-" if a.usd_per_1m_tokens is None else f"{a.usd_per_1m_tokens:g} USD/1M"
    return (f"{a.name}: base={a.base_model} owner={a.owner} "
            f"shared={','.join(a.shared_with) or '-'} rank={a.rank} price={price} "
            f"sha256={a.sha256[:16]} path={a.path}")


def run(args) -> int:
    from moestack.api.adapter_checks import check_and_register
    from moestack.tenancy import adapters as registry

    def command(store) -> None:
        cmd = args.adapters_command
        if cmd == "add":
            record = check_and_register(
                store, load_config(args.config), name=args.name, base_model=args.base_model,
                path=args.path, owner=args.owner,
                shared_with=[t.strip() for t in args.share_with.split(",") if t.strip()],
                usd_per_1m_tokens=args.usd_per_1m_tokens)
            print(_show(record))
        elif cmd == "list":
            records = registry.list_adapters(store, args.tenant)
            if args.json:
                print(json.dumps([a.as_json() for a in records], indent=2))
            else:
                for a in records:
                    print(_show(a))
        elif cmd == "remove":
            record = registry.unregister_adapter(store, args.name)
            print(f"removed {record.name} (base {record.base_model}); gateways answer 404 for "
                  "it within tenancy.auth_cache_ttl_s")

    return with_store(args, command)
