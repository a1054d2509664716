"""PNG plots of a run (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moestack.loadtest.client import RequestResult
from moestack.loadtest.report import latency_series
from moestack.plotting import pyplot, save_figure


def latency_cdfs(results: Sequence[RequestResult], path: Path) -> Path:
    plt = pyplot()
    series = latency_series([r for r in results if r.ok])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, values) in zip(axes, series.items()):
        name = key.upper()
        values = sorted(v * 1000 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    return save_figure(fig, path)


def timeline(results: Sequence[RequestResult], path: Path, bin_s: float = 1.0) -> Path:
    """Completed requests, output tokens and failures per second, by completion time."""
    plt = pyplot()
    ends = [(r.sent_s + (r.e2e_s or 0.0), r) for r in results]
    horizon = max((t for t, _ in ends), default=0.0)
    bins = int(horizon / bin_s) + 1
    done, tokens, failed = [0] * bins, [0] * bins, [0] * bins
    for t, r in ends:
        b = int(t / bin_s)
        if r.ok:
            done[b] += 1
            tokens[b] += r.completion_tokens
        else:
            failed[b] += 1
    xs = [i * bin_s for i in range(bins)]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(xs, [t / bin_s for t in tokens], label="output tokens/s")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [d / bin_s for d in done], color="tab:green", label="requests/s")
    ax2.plot(xs, [f / bin_s for f in failed], color="tab:red", label="failed/s")
    ax2.set_ylabel("requests/s")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def tenant_shares(report: dict, path: Path) -> Path:
    plt = pyplot()
    tenants = report["fairness"]["tenants"]
    names = list(tenants)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names)), 3.6))
    tokens = [(tenants[n]["token_share"] or 0) * 100 for n in names]
    weights = [tenants[n]["weight_share"] * 100 for n in names]
    ax.bar([x - 0.2 for x in xs], tokens, width=0.4, label="token share")
    ax.bar([x + 0.2 for x in xs], weights, width=0.4, label="weight share")
    ax.set_xticks(list(xs), names)
    if max(map(len, names), default=0) > 10:  # side by side, longer names would overlap
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylim(0, max([*tokens, *weights, 1.0]) * 1.25)  # room for the legend above the bars
    ax.set_ylabel("%")
    jain = report["fairness"]["jain_index"]
    ax.set_title(f"Tenant shares (Jain's index {jain:.3f})" if jain is not None
                 else "Tenant shares")
    ax.legend(ncol=2, loc="upper center", fontsize="small")
    return save_figure(fig, path)


def cost_comparison(report: dict, path: Path) -> Path:
    plt = pyplot()
    c = report["cost"]
    bars = {"self-hosted": c["self_hosted_usd_per_1m_tokens"]}
    bars.update({n: b["usd_per_1m_tokens"] for n, b in c["baselines"].items()})
    bars = {n: v for n, v in bars.items() if v}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
    colors = ["tab:green" if n == "self-hosted" else "tab:gray" for n in bars]
    ax.bar(list(bars), list(bars.values()), color=colors)
    if bars:
        ax.set_yscale("log")
    ax.set_ylabel("USD per 1M tokens (this run's token mix)")
    ax.tick_params(axis="x", rotation=45)
    return save_figure(fig, path)


def write_plots(results: Sequence[RequestResult], report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [latency_cdfs(results, out_dir / "latency_cdf.png"),
            timeline(results, out_dir / "timeline.png"),
            tenant_shares(report, out_dir / "tenant_shares.png"),
            cost_comparison(report, out_dir / "cost_per_1m_tokens.png")]
