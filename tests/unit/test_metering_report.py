"""`moestack cost report`: its figures are the usage ledger's, per tenant and in total."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from moestack.cli import main
from moestack.metering.pricing import load_pricing
from moestack.metering.report import TOTAL, build_report, format_table
from moestack.tenancy import query_usage
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

CATALOG = load_pricing()
MODEL = "fake-moe"


@dataclass
class Row:
    tenant: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    baseline_costs_usd: dict | None


def test_sums_stored_costs_and_prices_unpriced_rows_with_the_catalog():
    rows = [Row("a", "m", 1000, 0, 500, 0.002, {"gpt-5.5": 0.1}),
            Row("a", "m", 2000, 1000, 0, 0.001, None),
            Row("b", "m", 0, 0, 1_000_000, 1.0, None)]
    report = build_report(rows, CATALOG)
    a = next(t for t in report.tenants if t.tenant == "a")
    assert (a.requests, a.prompt_tokens, a.completion_tokens) == (2, 3000, 500)
    assert a.self_hosted_usd == 0.003
    gpt = CATALOG.baselines["gpt-5.5"]
    assert a.baseline_usd["gpt-5.5"] == 0.1 + gpt.usd(2000, 1000, 0)
    assert report.total.baseline_usd["gpt-5.5"] == math.fsum(
        [0.1, gpt.usd(2000, 1000, 0), gpt.usd(0, 0, 1_000_000)])
    b = next(t for t in report.tenants if t.tenant == "b")
    assert b.per_1m(b.self_hosted_usd) == 1.0
    assert b.savings_usd("gpt-5.5") == 30.0 - 1.0
    assert b.break_even_utilisation("gpt-5.5") == 1.0 / 30.0
    assert b.break_even_utilisation("deepseek-v4-flash") == 1.0 / 0.28


def test_cluster_cost_gives_utilisation_and_idle_included_cost():
    report = build_report([Row("a", "m", 500_000, 0, 500_000, 2.0, None)], CATALOG,
                          cluster_usd=8.0)
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
        rows = query_usage(stack.tenancy.store)
    return url, rows


async def test_report_equals_the_ledger_exactly(ledger):
    _, rows = ledger
    assert len(rows) == 5
    report = build_report(rows, CATALOG)
    for line in report.tenants:
        mine = [r for r in rows if r.tenant == line.tenant]
        assert line.requests == len(mine)
        assert line.prompt_tokens == sum(r.prompt_tokens for r in mine)
        assert line.completion_tokens == sum(r.completion_tokens for r in mine)
        assert line.self_hosted_usd == math.fsum(r.cost_usd or 0.0 for r in mine)
    assert report.total.self_hosted_usd == math.fsum(r.cost_usd or 0.0 for r in rows)
    assert report.total.self_hosted_usd > 0


async def test_cli_prints_the_table_and_writes_html_with_png_plots(ledger, tmp_path, capsys):
    url, rows = ledger
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
