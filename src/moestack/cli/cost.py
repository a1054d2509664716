"""``moestack cost report [--since ...] [--html out.html]``: cost per 1M tokens self-hosted vs
each baseline API, per tenant, savings and break-even, from the hourly usage rollups (whole UTC
hours: ``--since`` rounds down to its hour)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from moestack.cli.tenants import add_store_args, open_store
from moestack.cli.usage import add_window_args
from moestack.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("cost", help="cost reports from the usage ledger")
    sub = p.add_subparsers(dest="cost_command", required=True)
    r = sub.add_parser("report", help="table (and PNG plots with --html) of USD per 1M tokens "
                       "self-hosted vs each baseline API, per tenant, savings, break-even")
    add_window_args(r)
    r.add_argument("--tenant", "-t", help="only this tenant")
    r.add_argument("--html", type=Path, help="write an HTML report here, its PNG plots beside it")
    r.add_argument("--pricing", type=Path, help="pricing catalog YAML (default: the config's "
                   "pricing_file, else the embedded catalog)")
    r.add_argument("--cluster-usd-per-hour", type=float, help="provisioned cluster cost per "
                   "hour over the period, to report utilisation and cost with idle included "
                   "(needs --since)")
    r.add_argument("--by-adapter", action="store_true", help="also split by LoRA adapter (from "
                   "the raw ledger rows, kept for tenancy.raw_usage_retention_days)")
    r.add_argument("--by-backend", action="store_true", help="also split by backend: "
                   "self-hosted replicas vs overflow providers, blended USD per 1M tokens and "
                   "the saving against sending everything to the API (raw ledger rows)")
    add_store_args(r)
    r.set_defaults(func=run_report)
    g = sub.add_parser("dashboards", help="create or update the Grafana dashboards "
                       "(monitoring/grafana/dashboards) in a Grafana server")
    g.add_argument("--grafana-url", required=True, help="e.g. http://grafana.monitoring:3000")
    g.add_argument("--dashboards", type=Path, default=Path("monitoring/grafana/dashboards"),
                   help="folder of dashboard JSON files")
    g.add_argument("--token-env", default="GRAFANA_TOKEN", help="environment variable holding "
                   "a Grafana service-account token (else GRAFANA_USER/GRAFANA_PASSWORD)")
    g.set_defaults(func=run_dashboards)


def run_report(args) -> int:
    from moestack.metering.pricing import load_pricing
    from moestack.metering.report import build_report, format_table, write_html
    from moestack.metering.splits import (
        by_adapter,
        format_adapter_table,
        format_backend_table,
        split,
    )
    from moestack.tenancy import query_usage, rollups
    from moestack.tenancy.tables import utcnow

    since, until = args.since, args.until
    config = load_config(args.config)
    catalog = load_pricing(args.pricing or config.pricing_file, config.cost.usd_per_gpu_hour)
    cluster_usd = None
    if args.cluster_usd_per_hour is not None:
        if since is None:
            print("moestack: --cluster-usd-per-hour needs --since", file=sys.stderr)
            return 2
        hours = ((until or utcnow()) - since).total_seconds() / 3600
        cluster_usd = args.cluster_usd_per_hour * hours
    store = open_store(args)
    try:
        rolls = rollups.query(store, tenant=args.tenant, since=since, until=until)
        entries = (query_usage(store, tenant=args.tenant, since=since, until=until)
                   if args.by_adapter or args.by_backend else None)
    finally:
        store.close()
    report = build_report(rolls, catalog, cluster_usd)
    print(format_table(report))
    if entries is not None and args.by_adapter:
        print("\nper adapter (raw ledger rows):")
        print(format_adapter_table(by_adapter(entries)))
    if entries is not None and args.by_backend:
        from moestack.metering.provider_prices import provider_prices

        prices = provider_prices(config.overflow.providers, catalog)

        def api_price(e):
            rule = config.overflow.rule(e.model)
            return prices[rule.provider].usd(e.prompt_tokens, e.cached_prompt_tokens,
                                             e.completion_tokens) if rule else None
        print("\nper backend (raw ledger rows):")
        print(format_backend_table(*split(entries, lambda e: e.backend, api_price)))
    if args.html:
        files = write_html(report, args.html)
        print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def run_dashboards(args) -> int:
    from moestack.metering.grafana import load_dashboards, provision

    credential = os.environ.get(args.token_env)
    if credential is None and "GRAFANA_USER" in os.environ:
        credential = (os.environ["GRAFANA_USER"], os.environ.get("GRAFANA_PASSWORD", ""))
    for d in provision(args.grafana_url, load_dashboards(args.dashboards),
                       credential=credential):
        print(f"{d.uid:20} {d.title:40} {args.grafana_url.rstrip('/')}{d.url}")
    return 0
