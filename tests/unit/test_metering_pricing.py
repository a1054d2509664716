"""The pricing catalog: schema checks, accelerator lookups, overrides, the shipped default."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from moestack.config import parse_config
from moestack.errors import ConfigError
from moestack.metering.pricing import embedded_pricing_path, load_pricing, parse_pricing

REPO = Path(__file__).resolve().parents[2]


def _raw() -> dict:
    return yaml.safe_load(embedded_pricing_path().read_text())


def test_default_catalog_has_every_baseline_of_the_issue_with_source_and_date():
    catalog = load_pricing()
    expected = {"gpt-5.5": (5.0, 30.0), "gpt-5.4": (2.5, 15.0), "claude-sonnet-4.6": (3.0, 15.0),
                "claude-opus-4.6": (5.0, 25.0), "gemini-3.1-pro": (2.0, 12.0),
                "deepseek-v4-pro": (1.74, 3.48), "deepseek-v4-flash": (0.14, 0.28)}
    for name, (inp, out) in expected.items():
        b = catalog.baselines[name]
        assert (b.usd_per_1m_input_tokens, b.usd_per_1m_output_tokens) == (inp, out)
        assert b.usd_per_1m_cached_input_tokens < b.usd_per_1m_input_tokens
        assert b.source.startswith("https://") and b.as_of.year == 2026


def test_deploy_pricing_is_the_embedded_default():
    assert (REPO / "deploy" / "pricing.yaml").resolve() == embedded_pricing_path().resolve()
    assert load_pricing(REPO / "deploy" / "pricing.yaml") == load_pricing()


@pytest.mark.parametrize("kind", ["H100", "H200", "A100", "L40S", "B200", "cpu"])
def test_prices_every_accelerator_kind(kind):
    assert load_pricing().usd_per_gpu_hour(kind) > 0


def test_accepts_ray_spellings_of_accelerator_kinds():
    catalog = load_pricing()
    h100 = catalog.usd_per_gpu_hour("H100")
    assert catalog.usd_per_gpu_hour("accelerator_type:H100") == h100
    assert catalog.usd_per_gpu_hour("h100") == h100
    assert catalog.usd_per_gpu_hour("A100-80G") == catalog.usd_per_gpu_hour("A100")
    assert catalog.usd_per_gpu_hour("CPU") == catalog.usd_per_gpu_hour("cpu")


def test_unknown_accelerator_names_the_kind_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"`TPU-v5e`.*known: A100, B200, H100"):
        load_pricing().usd_per_gpu_hour("TPU-v5e")


def test_overrides_replace_single_prices_only():
    base = load_pricing()
    catalog = load_pricing(None, {"h100": 1.5})
    assert catalog.usd_per_gpu_hour("H100") == 1.5
    assert catalog.usd_per_gpu_hour("H200") == base.usd_per_gpu_hour("H200")


def test_config_cost_overrides_validate():
    config = parse_config({"models": [{"name": "m", "engine": "fake"}],
                           "cost": {"usd_per_gpu_hour": {"H100": 2.0}}})
    assert load_pricing(None, config.cost.usd_per_gpu_hour).usd_per_gpu_hour("H100") == 2.0
    with pytest.raises(ConfigError, match="usd_per_gpu_hour must be >= 0"):
        parse_config({"models": [{"name": "m", "engine": "fake"}],
                      "cost": {"usd_per_gpu_hour": {"H100": -1}}})


def test_rejects_baseline_without_source():
    raw = _raw()
    del raw["baselines"]["gpt-5.5"]["source"]
    with pytest.raises(ConfigError, match=r"baselines\.gpt-5\.5\.source: Field required"):
        parse_pricing(raw)


def test_rejects_negative_price_and_unknown_field():
    raw = _raw()
    raw["baselines"]["gpt-5.4"]["usd_per_1m_output_tokens"] = -1
    raw["baselines"]["gpt-5.4"]["usd_per_1m_reasoning_tokens"] = 1
    with pytest.raises(ConfigError) as err:
        parse_pricing(raw)
    assert "usd_per_1m_output_tokens" in str(err.value)
    assert "usd_per_1m_reasoning_tokens: unknown field" in str(err.value)


def test_rejects_catalog_without_cpu_price():
    raw = _raw()
    del raw["usd_per_gpu_hour"]["cpu"]
    with pytest.raises(ConfigError, match="needs a `cpu` entry"):
        parse_pricing(raw)


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read pricing catalog"):
        load_pricing(tmp_path / "missing.yaml")


def test_baseline_prices_cached_prompt_tokens_at_the_cached_rate():
    b = load_pricing().baselines["gpt-5.5"]
    # 1M prompt tokens of which 400k cached, 100k output: 0.6*5 + 0.4*0.5 + 0.1*30
    assert b.usd(1_000_000, 400_000, 100_000) == pytest.approx(3.0 + 0.2 + 3.0)
    assert b.as_of <= dt.date(2026, 12, 31)
