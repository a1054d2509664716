"""Scenario files are schema-checked; the shipped ones load; workloads follow them exactly."""

import statistics
from pathlib import Path

import pytest

from moestack.errors import ConfigError
from moestack.loadtest import build_workload, load_scenario, parse_scenario

SCENARIOS = sorted((Path(__file__).parents[2] / "loadtest" / "scenarios").glob("*.yaml"))


def scenario(**over):
    raw = {"name": "t", "model": "fake-moe", "num_requests": 2000, "seed": 7,
           "tenants": [{"name": "a"}], "prompt_tokens": {"mean": 10},
           "output_tokens": {"mean": 5}}
    raw.update(over)
    return parse_scenario(raw)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_shipped_scenario_loads(path):
    s = load_scenario(path)
    assert s.name == path.stem
    assert build_workload(s)


def test_rejects_unknown_field_naming_it():
    with pytest.raises(ConfigError, match="arrival.rate"):
        scenario(arrival={"rate": 3})


def test_rejects_min_above_max():
    with pytest.raises(ConfigError, match="min"):
        scenario(prompt_tokens={"kind": "uniform", "mean": 5, "min": 10, "max": 2})


def test_rejects_duplicate_tenants():
    with pytest.raises(ConfigError, match="unique"):
        scenario(tenants=[{"name": "a"}, {"name": "a"}])


def test_same_seed_gives_same_requests_and_other_seed_differs():
    assert build_workload(scenario()) == build_workload(scenario())
    assert build_workload(scenario()) != build_workload(scenario(seed=8))


def test_poisson_arrivals_have_the_configured_mean_rate_and_unit_cv():
    specs = build_workload(scenario(arrival={"process": "poisson", "rate_rps": 20}))
    gaps = [b.start_s - a.start_s for a, b in zip(specs, specs[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.08)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.1)


def test_bursty_arrivals_keep_the_rate_but_are_burstier():
    specs = build_workload(scenario(arrival={"process": "bursty", "rate_rps": 20,
                                             "burstiness_cv": 3}))
    gaps = [b.start_s - a.start_s for a, b in zip(specs, specs[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.25)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) > 2


def test_no_rate_sends_everything_at_once():
    assert {s.start_s for s in build_workload(scenario())} == {0.0}


def test_tenant_mix_follows_shares():
    specs = build_workload(scenario(tenants=[{"name": "a", "share": 3}, {"name": "b"}]))
    share_a = sum(s.tenant == "a" for s in specs) / len(specs)
    assert share_a == pytest.approx(0.75, abs=0.03)


def test_lengths_follow_distribution_and_bounds():
    specs = build_workload(scenario(
        prompt_tokens={"kind": "lognormal", "mean": 100, "stddev": 50, "min": 20, "max": 300},
        output_tokens={"kind": "uniform", "mean": 10, "min": 4, "max": 16}))
    prompts = [s.prompt_words for s in specs]
    assert min(prompts) >= 20 and max(prompts) <= 300
    assert statistics.fmean(prompts) == pytest.approx(100, rel=0.08)
    assert all(len(s.prompt.split()) == s.prompt_words for s in specs)
    outs = [s.max_tokens for s in specs]
    assert min(outs) == 4 and max(outs) == 16


def test_shared_prefix_share_and_content():
    specs = build_workload(scenario(prompt_tokens={"mean": 50},
                                    shared_prefix={"fraction": 0.4, "prefix_tokens": 30,
                                                   "num_prefixes": 2}))
    with_prefix = [s for s in specs if s.prefix_id is not None]
    assert len(with_prefix) / len(specs) == pytest.approx(0.4, abs=0.04)
    for pid in (0, 1):
        heads = {" ".join(s.prompt.split()[:30]) for s in with_prefix if s.prefix_id == pid}
        assert len(heads) == 1
    others = [s.prompt.split()[0] for s in specs if s.prefix_id is None]
    assert len(set(others)) == len(others)  # no accidental sharing without a prefix
    assert all(s.prompt_words == 50 for s in specs)


def test_replace_checks_the_changed_fields():
    s = scenario().replace(num_requests=5, arrival={"rate_rps": 2})
    assert s.num_requests == 5 and s.arrival.rate_rps == 2
    with pytest.raises(ConfigError, match="num_requests"):
        scenario().replace(num_requests=0)
