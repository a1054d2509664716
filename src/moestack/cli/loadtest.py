"""``moestack loadtest``: run a multi-tenant load scenario against an OpenAI-compatible URL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest", help="send a scenario's multi-tenant load to an OpenAI-compatible URL and "
        "report TTFT, ITL, E2E, throughput, goodput, fairness and USD per 1M tokens")
    p.add_argument("--scenario", "-s", required=True,
                   help="scenario YAML (see loadtest/scenarios/)")
    p.add_argument("--url", required=True, help="base URL ending in /v1, e.g. "
                   "http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="API key of tenants whose scenario entry sets no "
                   "api_key_env")
    p.add_argument("--out", type=Path, help="folder for report.json, requests.jsonl and PNG "
                   "plots")
    p.add_argument("--pricing", type=Path, help="pricing catalog YAML (default: the embedded "
                   "catalog)")
    p.add_argument("--num-requests", type=int, help="override the scenario's num_requests")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def run(args) -> int:
    from moestack.loadtest import load_scenario, render_text, resolve_api_keys, run_scenario
    from moestack.metering.pricing import load_pricing

    scenario = load_scenario(args.scenario)
    if args.num_requests:
        scenario = scenario.replace(num_requests=args.num_requests)
    catalog = load_pricing(args.pricing)
    keys = resolve_api_keys(scenario, args.api_key)
    result = asyncio.run(run_scenario(scenario, args.url, keys, catalog=catalog,
                                      out_dir=args.out, progress=sys.stderr.isatty(),
                                      plots=not args.no_plots))
    print(render_text(result.report))
    for path in result.files:
        print(f"wrote {path}")
    return 0 if result.report["requests"]["completed"] else 1
