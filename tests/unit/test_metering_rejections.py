"""Requests refused before admission are counted per tenant and status."""

from __future__ import annotations

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

MODEL = "fake-moe"


def _rejections(text: str) -> dict[tuple[str, str], float]:
    for family in text_string_to_metric_families(text):
        if family.name == "moestack_tenant_rejections":
            return {(s.labels["tenant"], s.labels["status"]): s.value for s in family.samples}
    return {}


async def test_counts_rate_limited_and_unauthenticated_requests_per_tenant(tmp_path):
    config = fake_config(fake_model(MODEL), storage={"url": f"sqlite:///{tmp_path}/t.db"},
                         tenancy={"enabled": True})
    async with local_stack(config) as stack:
        _, key = stack.tenancy.store.create_tenant("acme", requests_per_min=1)
        client = stack.openai(api_key=key.plaintext)
        await client.completions.create(model=MODEL, prompt="a b", max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(model=MODEL, prompt="a b", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            await stack.openai(api_key="sk-wrong").completions.create(
                model=MODEL, prompt="a b", max_tokens=2)
        text = (await stack.operator.get("/metrics")).text
    assert _rejections(text) == {("acme", "429"): 1.0, ("unknown", "401"): 1.0}
    assert 'moestack_tenant_requests_total{model="fake-moe",status="200",tenant="acme"} 1.0' \
        in text
