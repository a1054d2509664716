"""Copy the Prometheus rules and Grafana dashboards of monitoring/ into the chart.

Helm can only read files inside the chart, so the chart keeps a copy:
monitoring/prometheus/rules/*.yml -> helm/moestack/files/prometheus/ (one PrometheusRule) and
monitoring/grafana/dashboards/*.json -> helm/moestack/files/grafana/ (one ConfigMap each).
The tests fail while the copy differs from the source; run this to refresh it:

    .venv/bin/python helm/tools/sync_monitoring.py          # copy
    .venv/bin/python helm/tools/sync_monitoring.py --check  # exit 1 when they differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART_FILES = REPO / "helm" / "moestack" / "files"
SOURCES = {
    "prometheus": (REPO / "monitoring" / "prometheus" / "rules", ("*.yml", "*.yaml")),
    "grafana": (REPO / "monitoring" / "grafana" / "dashboards", ("*.json",)),
}


def _files(in_chart: bool) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for target, (folder, patterns) in SOURCES.items():
        root = CHART_FILES / target if in_chart else folder
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                out[f"{target}/{path.name}"] = path.read_bytes()
    return out


def source_files() -> dict[str, bytes]:
    """Chart-relative path (under files/) -> content, as the source folders have them."""
    return _files(in_chart=False)


def chart_files() -> dict[str, bytes]:
    """Chart-relative path (under files/) -> content, as the chart has them."""
    return _files(in_chart=True)


def sync() -> list[str]:
    """Make the chart's copy equal the source; returns the paths written or removed."""
    want, have = source_files(), chart_files()
    changed = []
    for rel in sorted(set(have) - set(want)):
        (CHART_FILES / rel).unlink()
        changed.append(f"removed {rel}")
    for rel, content in sorted(want.items()):
        if have.get(rel) != content:
            (CHART_FILES / rel).parent.mkdir(parents=True, exist_ok=True)
            (CHART_FILES / rel).write_bytes(content)
            changed.append(f"wrote {rel}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the copy differs")
    args = parser.parse_args(argv)
    if args.check:
        if source_files() != chart_files():
            print("helm/moestack/files differs from monitoring/: run helm/tools/sync_monitoring.py",
                  file=sys.stderr)
            return 1
        return 0
    for line in sync():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
