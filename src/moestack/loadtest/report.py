"""Summaries of a load-test run: latency percentiles, throughput, goodput, fairness, cost.

Metric names and definitions match ``vllm bench serve`` (``vllm/benchmarks/serve.py``):

- ``ttft``: time to first token, per request;
- ``tpot``: time per output token excluding the first, ``(e2el - ttft) / (output_tokens - 1)``,
  per request with at least two output tokens;
- ``itl``: inter-token latency, every gap between consecutive streamed chunks of every request;
- ``e2el``: end-to-end request latency;
- request/output/total token throughput: completed requests and their tokens over the run's
  wall-clock duration (from the first send to the last response);
- goodput: completed requests per second that met every SLO set in the scenario (vLLM's
  ``--goodput``).

Percentiles use linear interpolation (``numpy.percentile``), as vLLM does. All times are seconds.
Fairness: each tenant's share of served tokens (prompt + completion) against its weight share,
and Jain's index over tokens served per unit of weight: ``(sum x)^2 / (n * sum x^2)``, 1.0 when
every tenant got tokens in proportion to its weight. It measures the scheduler only when every
tenant keeps more work queued than it is given (a backlogged scenario); with light load it
mirrors the tenants' own demand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from moestack.loadtest.client import RequestResult
from moestack.loadtest.scenario import Scenario, SloConfig
from moestack.metering.pricing import PricingCatalog

PERCENTILES = (50, 90, 99)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, std, p50/p90/p99 and max of ``values`` (None for each when empty)."""
    if not values:
        return {"count": 0, "mean": None, "std": None, "max": None,
                **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | int | None] = {"count": int(arr.size), "mean": float(arr.mean()),
                                          "std": float(arr.std()), "max": float(arr.max())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index of ``values``: 1.0 when all equal, 1/n when one gets everything."""
    if not values:
        return None
    total, squares = sum(values), sum(v * v for v in values)
    if squares == 0:
        return 1.0
    return total * total / (len(values) * squares)


def meets_slo(result: RequestResult, slo: SloConfig) -> bool:
    if not result.ok:
        return False
    if slo.ttft_s is not None and (result.ttft_s is None or result.ttft_s > slo.ttft_s):
        return False
    if slo.tpot_s is not None and (result.tpot_s or 0.0) > slo.tpot_s:
        return False
    return not (slo.e2e_s is not None and (result.e2e_s or 0.0) > slo.e2e_s)


def _error_kind(result: RequestResult) -> str:
    code = (result.error or "").split(":")[0].strip() or "unknown"
    return f"{result.status} {code}" if result.status else code


def latency_series(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Seconds per metric (ttft, tpot, itl: every gap, e2el) over ``results``."""
    return {"ttft": [r.ttft_s for r in results if r.ttft_s is not None],
            "tpot": [r.tpot_s for r in results if r.tpot_s is not None],
            "itl": [gap for r in results for gap in r.itl_s],
            "e2el": [r.e2e_s for r in results if r.e2e_s is not None]}


def _latencies(results: Sequence[RequestResult]) -> dict[str, dict]:
    return {name: distribution(values) for name, values in latency_series(results).items()}


def _tokens(results: Sequence[RequestResult]) -> dict[str, int]:
    return {"prompt": sum(r.prompt_tokens for r in results),
            "cached_prompt": sum(r.cached_prompt_tokens for r in results),
            "completion": sum(r.completion_tokens for r in results)}


def fairness(scenario: Scenario, ok: Sequence[RequestResult],
             everything: Sequence[RequestResult]) -> dict:
    weights = {t.name: t.weight for t in scenario.tenants}
    weight_total = sum(weights.values())
    served = {name: 0 for name in weights}
    for r in ok:
        served[r.tenant] += r.prompt_tokens + r.completion_tokens
    total = sum(served.values())
    tenants = {}
    for name in weights:
        mine = [r for r in ok if r.tenant == name]
        series = latency_series(mine)
        tenants[name] = {
            "requests": sum(1 for r in everything if r.tenant == name),
            "failed": sum(1 for r in everything if r.tenant == name and not r.ok),
            "tokens": _tokens(mine),
            "token_share": served[name] / total if total else None,
            "weight_share": weights[name] / weight_total,
            "ttft_p50_s": distribution(series["ttft"])["p50"],
            "e2el_p50_s": distribution(series["e2el"])["p50"],
        }
    per_weight = [served[n] / weights[n] for n in weights]
    return {"jain_index": jain_index(per_weight), "tenants": tenants}


def cost(scenario: Scenario, tokens: dict[str, int], duration_s: float,
         catalog: PricingCatalog | None) -> dict:
    """Self-hosted USD per 1M tokens over the run, and what the same tokens cost at each
    baseline API (prices from the pricing catalog)."""
    total = tokens["prompt"] + tokens["completion"]
    usd_per_hour = scenario.cost.usd_per_hour
    if usd_per_hour is None and scenario.cost.accelerator and catalog is not None:
        usd_per_hour = (catalog.usd_per_gpu_hour(scenario.cost.accelerator)
                        * scenario.cost.accelerator_count)
    self_usd = usd_per_hour * duration_s / 3600 if usd_per_hour is not None else None
    self_per_1m = self_usd / total * 1e6 if self_usd is not None and total else None
    baselines = {}
    for name, price in (catalog.baselines.items() if catalog is not None else ()):
        usd = price.usd(tokens["prompt"], tokens["cached_prompt"], tokens["completion"])
        per_1m = usd / total * 1e6 if total else None
        baselines[name] = {
            "provider": price.provider, "usd": usd, "usd_per_1m_tokens": per_1m,
            "self_hosted_cost_ratio": (self_per_1m / per_1m
                                       if self_per_1m is not None and per_1m else None)}
    return {"deployment_usd_per_hour": usd_per_hour, "self_hosted_usd": self_usd,
            "self_hosted_usd_per_1m_tokens": self_per_1m, "baselines": baselines}


def summarize(scenario: Scenario, results: Sequence[RequestResult], duration_s: float,
              catalog: PricingCatalog | None = None) -> dict:
    """The JSON-ready report of one run (see the module docstring for definitions)."""
    ok = [r for r in results if r.ok]
    tokens = _tokens(ok)
    good = sum(1 for r in ok if meets_slo(r, scenario.slo))
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "scenario": scenario.name,
        "model": scenario.model,
        "endpoint": scenario.endpoint,
        "stream": scenario.stream,
        "duration_s": duration_s,
        "requests": {"sent": len(results), "completed": len(ok), "failed": len(results) - len(ok),
                     "errors": dict(Counter(_error_kind(r) for r in results if not r.ok))},
        "throughput": {"requests_per_s": per_s(len(ok)),
                       "output_tokens_per_s": per_s(tokens["completion"]),
                       "total_tokens_per_s": per_s(tokens["prompt"] + tokens["completion"]),
                       "goodput_requests_per_s": per_s(good)},
        "slo": {**scenario.slo.model_dump(),
                "attainment": good / len(results) if results else None},
        "latency_s": _latencies(ok),
        "tokens": tokens,
        "fairness": fairness(scenario, ok, results),
        "cost": cost(scenario, tokens, duration_s, catalog),
    }


def _fmt(value, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.2f}{unit}"


def render_text(report: dict) -> str:
    """A short human-readable table of ``report``."""
    req, thr, lat = report["requests"], report["throughput"], report["latency_s"]
    lines = [f"scenario {report['scenario']}  model {report['model']}  "
             f"duration {report['duration_s']:.1f} s",
             f"requests: sent {req['sent']}  completed {req['completed']}  failed {req['failed']}"
             + (f"  errors {req['errors']}" if req["errors"] else ""),
             f"throughput: {thr['requests_per_s']:.2f} req/s  "
             f"{thr['output_tokens_per_s']:.1f} output tok/s  "
             f"{thr['total_tokens_per_s']:.1f} total tok/s  "
             f"goodput {thr['goodput_requests_per_s']:.2f} req/s",
             f"{'ms':>8} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        d = lat[name]
        lines.append(f"{name:>8} " + " ".join(f"{_fmt(d[k], 1000):>9}"
                                               for k in ("mean", "p50", "p90", "p99")))
    fair = report["fairness"]
    lines.append(f"fairness: Jain's index {_fmt(fair['jain_index'])}")
    for name, t in fair["tenants"].items():
        lines.append(f"  {name:<16} requests {t['requests']:>5}  failed {t['failed']:>4}  "
                     f"token share {_fmt(t['token_share'], 100, '%'):>8}  "
                     f"weight share {_fmt(t['weight_share'], 100, '%'):>8}")
    c = report["cost"]
    usd = (lambda v: "-" if v is None else f"{v:.4g}")  # noqa: E731
    lines.append(f"USD per 1M tokens: self-hosted {usd(c['self_hosted_usd_per_1m_tokens'])}")
    for name, b in c["baselines"].items():
        ratio = b["self_hosted_cost_ratio"]
        lines.append(f"  {name:<22} {usd(b['usd_per_1m_tokens']):>8}"
                     + (f"  (self-hosted costs {ratio:.3g}x of it)" if ratio else ""))
    return "\n".join(lines)
