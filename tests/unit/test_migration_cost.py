"""A migrated request's re-prefill is the operator's overhead: counted in its own metrics and
cost, in no tenant's, and the cost split still adds up to the cluster's cost."""

import pytest

from moestack.metering.cost import CostAccountant
from moestack.metering.metrics import GatewayMetrics
from moestack.testing import fake_config, fake_model


def test_overhead_is_split_apart_and_the_split_still_adds_up():
    acc = CostAccountant()
    acc.add_work("a", "m", 3.0)
    acc.add_overhead("m", 1.0)
    done = acc.split(10.0)
    assert done.tenant_usd == {("a", "m"): 3.0} and done.overhead_usd == {"m": 1.0}
    assert done.idle_usd == pytest.approx(6.0)
    acc.add_work("a", "m", 6.0)
    acc.add_overhead("m", 2.0)
    done = acc.split(4.0)  # more work than the period cost: split in proportion
    assert done.tenant_usd[("a", "m")] == pytest.approx(3.0)
    assert done.overhead_usd["m"] == pytest.approx(1.0) and done.idle_usd == 0.0


def test_record_migration_counts_the_resumption_its_tokens_and_their_cost():
    config = fake_config(fake_model("m"))
    metrics = GatewayMetrics(config=config, resources=lambda: _resources(config))
    metrics.record_migration("m", 1000)
    metrics.record_migration("m", 500, "drain")
    metrics.accrue()
    text = metrics.exposition().decode()
    assert 'moestack_migrated_requests_total{model="m",reason="failure"} 1.0' in text
    assert 'moestack_migrated_requests_total{model="m",reason="drain"} 1.0' in text
    assert 'moestack_migration_reprefill_tokens_total{model="m"} 1500.0' in text
    cost = metrics.cost_model.reprefill_usd("m", 1500)
    assert cost > 0
    line = next(ln for ln in text.splitlines()
                if ln.startswith('moestack_overhead_cost_usd_total{model="m"}'))
    assert float(line.split()[-1]) > 0
    assert "moestack_tenant_cost_usd_total{" not in text  # billed to no tenant


def _resources(config):
    from moestack.metering.cost import ProvisionedResources

    return ProvisionedResources.from_config(config)
