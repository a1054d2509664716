"""Cost report over hourly usage rollups: USD per 1M tokens self-hosted vs each baseline API, per
tenant, savings and break-even utilisation; as a text table, PNG plots and an HTML page.

It reads rollups with the :class:`RollupLike` fields (the store's
:class:`~moestack.tenancy.rollups.Rollup`, or raw ledger rows summed by
:func:`moestack.tenancy.rollups.aggregate`), and its sums are the ledger's figures: ``cost_nusd``
and ``baselines_nusd`` as stored, in integer nano-USD, so the report from rollups equals the
report from raw rows exactly. Tokens of rows whose baselines were not priced when settled
(``unpriced_*``) are priced with the catalog here.

``cost_usd`` values engine work at the measured cost per token (a saturated engine), so
``self_hosted_usd / baseline_usd`` is the utilisation at which self-hosting costs what the API
does (break-even). With the cluster's provisioned cost over the period, the report also
gives the real cost per 1M tokens (idle included) and the utilisation.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from moestack.metering.pricing import PricingCatalog
from moestack.usage import NUSD_PER_USD, to_nusd

TOTAL = "(all tenants)"


class RollupLike(Protocol):
    tenant: str
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost_nusd: int
    baselines_nusd: Mapping[str, int]
    unpriced_prompt_tokens: int
    unpriced_cached_prompt_tokens: int
    unpriced_completion_tokens: int


@dataclass
class CostLine:
    """Totals of one tenant (or of all tenants)."""

    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    self_hosted_usd: float = 0.0
    baseline_usd: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def per_1m(self, usd: float) -> float | None:
        return usd / self.tokens * 1e6 if self.tokens else None

    def savings_usd(self, baseline: str) -> float:
        return self.baseline_usd[baseline] - self.self_hosted_usd

    def break_even_utilisation(self, baseline: str) -> float | None:
        b = self.baseline_usd[baseline]
        return self.self_hosted_usd / b if b > 0 else None


@dataclass
class CostReport:
    total: CostLine
    tenants: list[CostLine]
    baselines: list[str]
    cluster_usd: float | None = None
    """The cluster's provisioned cost over the period, if known."""

    @property
    def utilisation(self) -> float | None:
        return self.total.self_hosted_usd / self.cluster_usd if self.cluster_usd else None


def build_report(rollups: Iterable[RollupLike], catalog: PricingCatalog,
                 cluster_usd: float | None = None) -> CostReport:
    """Sum rollups per tenant and in total (exact: integer nano-USD)."""
    names = list(catalog.baselines)
    lines: dict[str, CostLine] = {}
    nusd: dict[str, dict[str, int]] = {}
    total = CostLine(TOTAL)
    total_nusd = dict.fromkeys(["self", *names], 0)
    for r in rollups:
        line = lines.setdefault(r.tenant, CostLine(r.tenant))
        mine = nusd.setdefault(r.tenant, dict.fromkeys(["self", *names], 0))
        for target in (line, total):
            target.requests += r.requests
            target.prompt_tokens += r.prompt_tokens
            target.cached_prompt_tokens += r.cached_prompt_tokens
            target.completion_tokens += r.completion_tokens
        parts = {"self": r.cost_nusd}
        for n in names:
            priced = catalog.baselines[n].usd(r.unpriced_prompt_tokens,
                                              r.unpriced_cached_prompt_tokens,
                                              r.unpriced_completion_tokens)
            parts[n] = r.baselines_nusd.get(n, 0) + to_nusd(priced)
        for bucket in (mine, total_nusd):
            for k, v in parts.items():
                bucket[k] += v
    for tenant, line in lines.items():
        _fill(line, nusd[tenant], names)
    _fill(total, total_nusd, names)
    return CostReport(total, sorted(lines.values(), key=lambda x: x.tenant), names, cluster_usd)


def _fill(line: CostLine, nusd: Mapping[str, int], names: list[str]) -> None:
    line.self_hosted_usd = nusd["self"] / NUSD_PER_USD
    line.baseline_usd = {n: nusd[n] / NUSD_PER_USD for n in names}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: CostReport) -> str:
    t = report.total
    out = [f"{'tenant':16} {'requests':>8} {'prompt':>10} {'cached':>9} {'completion':>10} "
           f"{'self-hosted USD':>16} {'USD/1M tok':>11}"]
    for line in [*report.tenants, t]:
        out.append(f"{line.tenant[:16]:16} {line.requests:>8} {line.prompt_tokens:>10} "
                   f"{line.cached_prompt_tokens:>9} {line.completion_tokens:>10} "
                   f"{line.self_hosted_usd:>16.6f} "
                   f"{_fmt(line.per_1m(line.self_hosted_usd), '.4f'):>11}")
    out.append("")
    out.append(f"{'baseline':20} {'USD':>14} {'USD/1M tok':>11} {'savings USD':>14} "
               f"{'break-even util':>16}")
    for n in report.baselines:
        be = t.break_even_utilisation(n)
        out.append(f"{n[:20]:20} {t.baseline_usd[n]:>14.6f} "
                   f"{_fmt(t.per_1m(t.baseline_usd[n]), '.4f'):>11} {t.savings_usd(n):>14.6f} "
                   f"{_fmt(None if be is None else be * 100, '.2f') + '%':>16}")
    if report.cluster_usd is not None:
        out.append("")
        out.append(f"cluster cost over the period: {report.cluster_usd:.6f} USD; "
                   f"utilisation {_fmt(report.utilisation and report.utilisation * 100, '.2f')}%; "
                   f"USD per 1M tokens idle included: {_fmt(t.per_1m(report.cluster_usd), '.4f')}")
    return "\n".join(out)


def write_plots(report: CostReport, prefix: Path) -> list[Path]:
    """PNG plots next to ``prefix``: cost per 1M tokens vs baselines, per-tenant spend,
    savings, break-even utilisation. Returns the files written."""
    from moestack.plotting import pyplot, save_figure

    plt = pyplot()
    t, names = report.total, report.baselines
    files = []

    def save(fig, name: str) -> None:
        files.append(save_figure(fig, prefix.parent / f"{prefix.name}-{name}.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["self-hosted", *names]
    values = [t.per_1m(t.self_hosted_usd) or 0.0, *[t.per_1m(t.baseline_usd[n]) or 0.0
                                                     for n in names]]
    ax.bar(labels, values, color=["tab:green", *["tab:gray"] * len(names)])
    ax.set_ylabel("USD per 1M tokens")
    ax.set_title("Cost per 1M tokens: self-hosted vs baseline APIs")
    ax.tick_params(axis="x", rotation=30)
    save(fig, "cost_per_1m")

    fig, ax = plt.subplots(figsize=(8, 4))
    tenants = [line.tenant for line in report.tenants]
    ax.bar(tenants, [line.self_hosted_usd for line in report.tenants], label="self-hosted")
    ax.set_ylabel("USD")
    ax.set_title("Self-hosted cost per tenant")
    save(fig, "tenants")

    fig, ax = plt.subplots(figsize=(8, 4))
    savings = [t.savings_usd(n) for n in names]
    ax.bar(names, savings, color=["tab:green" if s >= 0 else "tab:red" for s in savings])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("USD saved (negative: the API is cheaper)")
    ax.set_title("Savings against each baseline")
    ax.tick_params(axis="x", rotation=30)
    save(fig, "savings")

    fig, ax = plt.subplots(figsize=(8, 4))
    be = [(t.break_even_utilisation(n) or 0.0) * 100 for n in names]
    ax.bar(names, be)
    ax.axhline(100, color="tab:red", linestyle="--", linewidth=0.8)
    if report.utilisation is not None:
        ax.axhline(report.utilisation * 100, color="tab:green", linewidth=1,
                   label="current utilisation")
        ax.legend()
    ax.set_ylabel("%")
    ax.set_title("Break-even utilisation per baseline (self-hosting wins above it)")
    ax.tick_params(axis="x", rotation=30)
    save(fig, "break_even")
    return files


def write_html(report: CostReport, path: Path) -> list[Path]:
    """An HTML page with the table and the PNG plots (written next to it)."""
    path = Path(path)
    plots = write_plots(report, path.with_suffix(""))
    imgs = "\n".join(f'<p><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></p>'
                     for p in plots)
    path.write_text("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
                    "<title>moestack cost report</title></head><body>\n"
                    "<h1>moestack cost report</h1>\n"
                    f"<pre>{html.escape(format_table(report))}</pre>\n{imgs}\n</body></html>\n",
                    encoding="utf-8")
    return [path, *plots]
