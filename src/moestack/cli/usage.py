"""``moestack usage [--tenant T] [--since 24h]``: read the usage ledger."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from moestack.cli.tenants import add_store_args, open_store


def time_arg(text: str):
    """argparse type of --since/--until (naive UTC datetime)."""
    from moestack.tenancy.ledger import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_window_args(p) -> None:
    p.add_argument("--since", type=time_arg,
                   help="2026-11-01, an ISO time, or a span back: 30m, 24h, 7d")
    p.add_argument("--until", type=time_arg, help="same forms as --since")


def register(subparsers) -> None:
    p = subparsers.add_parser("usage", help="usage per tenant and model from the hourly rollups; "
                              "--rows lists raw ledger rows (kept for the retention period)")
    p.add_argument("--tenant", "-t", help="only this tenant")
    add_window_args(p)
    p.add_argument("--rows", action="store_true", help="also list raw ledger rows, one per "
                   "request (exact times; only rows within the retention period)")
    p.add_argument("--limit", type=int, default=None, help="at most this many raw rows")
    p.add_argument("--json", action="store_true", help="print hourly rollups (or, with --rows, "
                   "raw rows) as JSON lines")
    p.add_argument("--totals", action="store_true", help="print only per tenant/model totals "
                   "(the default unless --rows)")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moestack.tenancy import rollups
    from moestack.tenancy.ledger import query_usage

    store = open_store(args)
    try:
        rolls = rollups.query(store, tenant=args.tenant, since=args.since, until=args.until)
        rows = (query_usage(store, tenant=args.tenant, since=args.since, until=args.until,
                            limit=args.limit) if args.rows and not args.totals else [])
    finally:
        store.close()
    if args.json:
        for r in rows:
            d = dict(r.__dict__)
            d["started_at"] = r.started_at.isoformat() + "Z"
            d["finished_at"] = r.finished_at.isoformat() + "Z" if r.finished_at else None
            print(json.dumps(d))
        if not rows:
            for roll in rolls:
                print(json.dumps({"tenant": roll.tenant, **roll.tenant_view(),
                                  "cost_usd": roll.cost_usd}))
        return 0
    if rows:
        print(f"{'started (UTC)':19}  {'tenant':12} {'model':18} {'status':>6} {'prompt':>7} "
              f"{'compl':>6} {'ttft_s':>7} {'usd':>10}  request_id")
        for r in rows:
            status = r.status_code if r.status_code is not None else r.state
            ttft = f"{r.ttft_s:.3f}" if r.ttft_s is not None else "-"
            print(f"{r.started_at:%Y-%m-%d %H:%M:%S}  {r.tenant[:12]:12} {r.model[:18]:18} "
                  f"{status!s:>6} {r.prompt_tokens:>7} {r.completion_tokens:>6} {ttft:>7} "
                  f"{r.charged_usd:>10.6f}  {r.request_id}")
        print()
    totals: dict = defaultdict(lambda: [0, 0, 0, 0])
    for roll in rolls:
        t = totals[(roll.tenant, roll.model)]
        t[0] += roll.requests
        t[1] += roll.prompt_tokens
        t[2] += roll.completion_tokens
        t[3] += roll.charged_nusd
    hours = "" if args.since is None else " (whole UTC hours from --since's hour)"
    print(f"totals from hourly rollups{hours}")
    print(f"{'tenant':12} {'model':18} {'requests':>8} {'prompt':>9} {'completion':>10} "
          f"{'usd':>12}")
    for (tenant, model), (n, p, c, nusd) in sorted(totals.items()):
        print(f"{tenant[:12]:12} {model[:18]:18} {n:>8} {p:>9} {c:>10} {nusd / 1e9:>12.6f}")
    return 0
