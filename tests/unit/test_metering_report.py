"""`moestack cost report`: its figures are the usage ledger's, per tenant and in total."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import pytest

from moestack.cli import main
from moestack.metering.pricing import load_pricing
from moestack.metering.report import TOTAL, build_report, format_table
from moestack.tenancy import query_usage, rollups
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack
from moestack.usage import to_nusd

CATALOG = load_pricing()
MODEL = "fake-moe"


@dataclass
class Row:
    """A ledger row with the fields :func:`rollups.aggregate` reads."""

    tenant: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    baseline_costs_usd: dict | None
    endpoint: str = "chat.completions"
    state: str = "settled"
    charged_tokens: int = 0
    charged_usd: float = 0.0
    started_at: dt.datetime = dt.datetime(2026, 11, 1, 12, 30)


def test_sums_stored_costs_and_prices_unpriced_rows_with_the_catalog():
    rows = [Row("a", "m", 1000, 0, 500, 0.002, {"gpt-5.5": 0.1}),
            Row("a", "m", 2000, 1000, 0, 0.001, None),
            Row("b", "m", 0, 0, 1_000_000, 1.0, None)]
    report = build_report(rollups.aggregate(rows), CATALOG)
    a = next(t for t in report.tenants if t.tenant == "a")
    assert (a.requests, a.prompt_tokens, a.completion_tokens) == (2, 3000, 500)
    assert a.self_hosted_usd == 0.003
    gpt = CATALOG.baselines["gpt-5.5"]
    assert a.baseline_usd["gpt-5.5"] == pytest.approx(0.1 + gpt.usd(2000, 1000, 0), abs=1e-9)
    assert report.total.baseline_usd["gpt-5.5"] == pytest.approx(math.fsum(
        [0.1, gpt.usd(2000, 1000, 0), gpt.usd(0, 0, 1_000_000)]), abs=1e-9)
    b = next(t for t in report.tenants if t.tenant == "b")
    assert b.per_1m(b.self_hosted_usd) == 1.0
    assert b.savings_usd("gpt-5.5") == 30.0 - 1.0
    assert b.break_even_utilisation("gpt-5.5") == 1.0 / 30.0
    assert b.break_even_utilisation("deepseek-v4-flash") == 1.0 / 0.28


def test_cluster_cost_gives_utilisation_and_idle_included_cost():
    report = build_report(rollups.aggregate([Row("a", "m", 500_000, 0, 500_000, 2.0, None)]),
                          CATALOG, cluster_usd=8.0)
    assert report.utilisation == 0.25
    assert "cluster cost over the period: 8.000000 USD; utilisation 25.00%" in format_table(report)


@pytest.fixture
async def ledger(tmp_path):
    """A ledger filled by real requests of two tenants through the API."""
    url = f"sqlite:///{tmp_path}/t.db"
    config = fake_config(fake_model(MODEL), storage={"url": url}, tenancy={
        "enabled": True, "prices": {MODEL: {"usd_per_1m_prompt_tokens": 3.0,
                                            "usd_per_1m_completion_tokens": 7.0}}})
    async with local_stack(config) as stack:
        for tenant, n in (("acme", 3), ("beta", 2)):
            _, key = stack.tenancy.store.create_tenant(tenant)
            client = stack.openai(api_key=key.plaintext)
            for i in range(n):
                await client.completions.create(model=MODEL, prompt="a b c " * (i + 1),
                                                max_tokens=5 + i)
        stack.tenancy.writer.flush()
        rows = query_usage(stack.tenancy.store)
        rolls = rollups.query(stack.tenancy.store)
    return url, rows, rolls


async def test_report_from_rollups_equals_the_raw_ledger_exactly(ledger):
    _, rows, rolls = ledger
    assert len(rows) == 5
    assert rolls == rollups.aggregate(rows)
    report = build_report(rolls, CATALOG)
    assert report == build_report(rollups.aggregate(rows), CATALOG)
    for line in report.tenants:
        mine = [r for r in rows if r.tenant == line.tenant]
        assert line.requests == len(mine)
        assert line.prompt_tokens == sum(r.prompt_tokens for r in mine)
        assert line.completion_tokens == sum(r.completion_tokens for r in mine)
        assert line.self_hosted_usd == sum(to_nusd(r.cost_usd) for r in mine) / 1e9
    assert report.total.self_hosted_usd == sum(to_nusd(r.cost_usd) for r in rows) / 1e9
    assert report.total.self_hosted_usd > 0


async def test_cli_prints_the_table_and_writes_html_with_png_plots(ledger, tmp_path, capsys):
    url, rows, _ = ledger
    out = tmp_path / "report.html"
    assert main(["cost", "report", "--db", url, "--since", "1h", "--html", str(out)]) == 0
    text = capsys.readouterr().out
    total = math.fsum(r.cost_usd or 0.0 for r in rows)
    assert f"{TOTAL:16}" in text and f"{total:>16.6f}" in text
    for name in CATALOG.baselines:
        assert name in text
    pngs = sorted(p.name for p in tmp_path.glob("report-*.png"))
    assert pngs == ["report-break_even.png", "report-cost_per_1m.png", "report-savings.png",
                    "report-tenants.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(p in out.read_text() for p in pngs)


def test_cli_rejects_a_bad_time(capsys):
    with pytest.raises(SystemExit) as info:
        main(["cost", "report", "--db", "sqlite://", "--since", "yesterday"])
    assert info.value.code == 2
    assert "not a time" in capsys.readouterr().err
