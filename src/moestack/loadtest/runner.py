"""Run a scenario against an OpenAI-compatible URL and write its report, results and plots."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from moestack.errors import ConfigError
from moestack.loadtest.client import RequestResult, run_requests
from moestack.loadtest.report import summarize
from moestack.loadtest.scenario import Scenario
from moestack.loadtest.workload import build_workload
from moestack.metering.pricing import PricingCatalog


@dataclass
class RunResult:
    report: dict
    results: list[RequestResult]
    files: list[Path]


def resolve_api_keys(scenario: Scenario, default_key: str | None,
                     environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Tenant name -> API key: from the tenant's ``api_key_env``, else ``default_key``."""
    keys = {}
    for tenant in scenario.tenants:
        if tenant.api_key_env:
            if not environ.get(tenant.api_key_env):
                raise ConfigError(f"tenant `{tenant.name}`: environment variable "
                                  f"{tenant.api_key_env} (its API key) is not set")
            keys[tenant.name] = environ[tenant.api_key_env]
        elif default_key:
            keys[tenant.name] = default_key
    return keys


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


async def run_scenario(scenario: Scenario, base_url: str, api_keys: Mapping[str, str],
                       *, catalog: PricingCatalog | None = None, out_dir: Path | None = None,
                       progress: bool = False, plots: bool = True,
                       transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Send the scenario's load to ``base_url`` (ending in ``/v1``) and summarise it.

    With ``out_dir``, writes ``report.json``, ``requests.jsonl`` (one line per request) and, with
    ``plots``, PNG plots there. ``transport`` lets tests drive an in-process ASGI app.
    """
    limits = httpx.Limits(max_connections=scenario.max_concurrency,
                          max_keepalive_connections=scenario.max_concurrency)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", transport=transport,
                                 limits=limits, timeout=scenario.timeout_s) as http:
        if scenario.warmup_requests:
            warm = build_workload(scenario, scenario.warmup_requests, seed_offset=1)
            warm = [dataclasses.replace(s, start_s=0.0) for s in warm]
            warm_scenario = scenario.model_copy(update={"max_concurrency": 1})
            await run_requests(http, warm_scenario, warm, api_keys)
        specs = build_workload(scenario)
        failed = 0
        with _progress(len(specs), progress) as bar:
            def done(result: RequestResult) -> None:
                nonlocal failed
                if not result.ok:
                    failed += 1
                    bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)

            started_at = time.time()
            outcome = await run_requests(http, scenario, specs, api_keys, on_done=done)
    report = summarize(scenario, outcome.results, outcome.duration_s, catalog)
    report["url"] = base_url
    report["started_at_unix_s"] = started_at
    files: list[Path] = []
    if out_dir is not None:
        files = write_outputs(report, outcome.results, Path(out_dir), plots)
    return RunResult(report, outcome.results, files)


def write_outputs(report: dict, results: list[RequestResult], out_dir: Path,
                  plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    requests_path = out_dir / "requests.jsonl"
    with requests_path.open("w") as f:
        for r in results:
            f.write(json.dumps({**dataclasses.asdict(r), "tpot_s": r.tpot_s}) + "\n")
    files = [report_path, requests_path]
    if plots:
        from moestack.loadtest.plots import write_plots

        files += write_plots(results, report, out_dir)
    return files
