"""The gateway's one request path: the hook chain's order, and what travels on the context."""

import pytest

from moestack.api.chain import HookChain
from moestack.hooks import RequestContext, RequestHook
from moestack.tenancy import query_usage
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack
from moestack.usage import RequestRecord

MODEL = "fake-moe"


class Trace(RequestHook):
    def __init__(self, name, log, refuse=False, fail_on_complete=False):
        self.name, self.log, self.refuse, self.fail = name, log, refuse, fail_on_complete

    async def on_request(self, ctx):
        self.log.append(("request", self.name))

    async def before_inference(self, ctx):
        self.log.append(("before", self.name))
        if self.refuse:
            raise RuntimeError("refused")

    async def on_complete(self, ctx):
        self.log.append(("complete", self.name))
        if self.fail:
            raise RuntimeError("broken")


class Recorder:
    def __init__(self):
        self.records: list[RequestRecord] = []

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)


async def test_only_the_hooks_a_request_entered_complete_it_last_in_first_out():
    log = []
    chain = HookChain([Trace("auth", log), Trace("admission", log),
                       Trace("queue", log, refuse=True), Trace("metering", log)])
    ctx = RequestContext("r1")
    await chain.on_request(ctx)
    with pytest.raises(RuntimeError):
        await chain.before_inference(ctx)
    await chain.on_complete(ctx)
    await chain.on_complete(ctx)  # once only
    assert log == [("request", "auth"), ("request", "admission"), ("request", "queue"),
                   ("request", "metering"), ("before", "auth"), ("before", "admission"),
                   ("before", "queue"), ("complete", "admission"), ("complete", "auth")]


async def test_a_failing_hook_does_not_keep_the_others_from_completing():
    log = []
    chain = HookChain([Trace("admission", log), Trace("metering", log, fail_on_complete=True)])
    ctx = RequestContext("r1")
    await chain.before_inference(ctx)
    await chain.on_complete(ctx)
    assert log[-2:] == [("complete", "metering"), ("complete", "admission")]


def test_the_context_never_shows_the_key():
    assert "sk-secret" not in repr(RequestContext("r1", api_key="sk-secret"))


async def test_each_request_is_priced_once_for_the_ledger_and_the_metrics(tmp_path):
    config = fake_config(fake_model(MODEL), storage={"url": f"sqlite:///{tmp_path}/t.db"},
                         tenancy={"enabled": True, "auth_cache_ttl_s": 0, "prices": {MODEL: {
                             "usd_per_1m_prompt_tokens": 1.0,
                             "usd_per_1m_completion_tokens": 2.0}}})
    sink = Recorder()
    async with local_stack(config, sinks=[sink]) as stack:
        key = stack.tenancy.store.create_tenant("acme")[1].plaintext
        model = stack.app.state.metrics.cost_model
        prices, price = [], model.price
        model.price = lambda rec: prices.append(price(rec)) or prices[-1]
        await stack.openai(key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        stack.tenancy.writer.flush()
        [row] = query_usage(stack.tenancy.store, tenant="acme")
        metrics = (await stack.operator.get("/metrics")).text
    [cost] = prices
    nano = {"abs": 1e-9}  # the ledger keeps nano-USD
    assert (row.charged_usd, row.cost_usd, row.baseline_costs_usd) == (
        pytest.approx(cost.charged_usd, **nano), pytest.approx(cost.self_hosted_usd, **nano),
        pytest.approx(dict(cost.baseline_usd), **nano))
    assert cost.charged_usd == pytest.approx((4 * 1.0 + 3 * 2.0) / 1e6)
    charged = f'moestack_tenant_charged_usd_total{{model="{MODEL}",tenant="acme"}}'
    assert f"{charged} {cost.charged_usd}" in metrics
    [record] = sink.records
    assert (record.tenant, record.request_id) == ("acme", row.request_id)
