"""Prometheus rules: valid for promtool, every rule unit-tested, every metric documented."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moestack.config import parse_config
from moestack.metering.metrics import GatewayMetrics

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = sorted((MONITORING / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "prometheus" / "tests").glob("*.test.yml"))


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: scripts/install.sh installs the Debian package prometheus"
    return path


def _rules() -> list[dict]:
    return [r for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def test_rule_files_pass_promtool_check():
    out = subprocess.run([_promtool(), "check", "rules", *map(str, RULES)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(test_file):
    out = subprocess.run([_promtool(), "test", "rules", test_file.name], cwd=test_file.parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_has_a_unit_test():
    tested_exprs, tested_alerts = set(), set()
    for f in RULE_TESTS:
        for t in yaml.safe_load(f.read_text())["tests"]:
            tested_exprs |= {c["expr"] for c in t.get("promql_expr_test", [])}
            tested_alerts |= {c["alertname"] for c in t.get("alert_rule_test", [])
                              if c.get("exp_alerts")}
    records = {r["record"] for r in _rules() if "record" in r}
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert records and alerts
    assert records - tested_exprs == set(), "recording rules without a promql_expr_test"
    assert alerts - tested_alerts == set(), "alerts without a test where they fire"


def test_rules_only_read_documented_metrics():
    documented = _documented_metrics()
    used = set()
    for r in _rules():
        used |= set(re.findall(r"\bmoestack_[a-z0-9_]+", r["expr"]))
    base = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in used}
    assert base - documented == set()


def _documented_metrics() -> set[str]:
    text = (MONITORING / "METRICS.md").read_text()
    return {re.sub(r"_total$", "", m) for m in re.findall(r"^### `(moestack_[a-z0-9_]+)`", text,
                                                           re.M)}


def test_every_exported_metric_is_documented_with_type_labels_unit_and_action():
    config = parse_config({"models": [{"name": "m", "engine": "fake"}]})
    metrics = GatewayMetrics(config=config)
    exported = {m.name for m in metrics.registry.collect()}
    documented = _documented_metrics()
    assert exported - documented == set(), "exported but not in monitoring/METRICS.md"
    assert documented - exported == set(), "documented but not exported"
    text = (MONITORING / "METRICS.md").read_text()
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        name = section.split("`")[1]
        for field in ("- Type:", "- Labels:", "- Unit:", "- When it moves:"):
            assert field in section, f"{name}: missing `{field}`"
