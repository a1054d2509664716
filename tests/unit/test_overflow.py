"""Overflow pieces on their own: config checks, the decision, the provider relay's usage and
bytes, provider prices, the overflow budget on a real SQLite store, metrics per backend, and
migration 0005 up and down. (Through the real stack: tests/integration/test_overflow_stack.py.)"""

import datetime as dt
import json
import logging

import httpx
import pytest
from alembic import command
from alembic.config import Config
from prometheus_client import generate_latest
from sqlalchemy import inspect, text

from moestack.config.schema import OverflowProviderConfig, OverflowRuleConfig
from moestack.errors import ConfigError
from moestack.metering.metrics import GatewayMetrics
from moestack.metering.pricing import load_pricing
from moestack.metering.provider_prices import provider_price
from moestack.overflow import Provider, ProviderError, Trigger, should_overflow
from moestack.overflow.providers import StreamMeter
from moestack.tenancy import ledger
from moestack.tenancy.admission import Reservation, admit, authenticate
from moestack.tenancy.overflow_budget import reserve_in, settle_in, spent_nusd
from moestack.tenancy.store import TenancyStore
from moestack.testing import fake_config
from moestack.usage import RequestRecord, Usage, to_nusd

OAI = {"name": "oai", "kind": "openai", "base_url": "http://127.0.0.1:9/v1",
       "api_key_env": "OAI_KEY", "model": "gpt-5.4"}


def config(**overflow):
    return fake_config(overflow={"providers": [OAI], **overflow})


def test_config_refuses_rules_naming_unknown_providers_or_models_and_inline_keys():
    with pytest.raises(ConfigError, match="unknown providers"):
        config(rules=[{"model": "fake-moe", "provider": "nope"}])
    with pytest.raises(ConfigError, match="unknown models"):
        config(rules=[{"model": "other", "provider": "oai"}])
    with pytest.raises(ConfigError, match="api_key"):
        fake_config(overflow={"providers": [{**OAI, "api_key": "sk-inline"}]})
    assert config(rules=[{"model": "fake-moe", "provider": "oai"}]).overflow.enabled


RULE = OverflowRuleConfig(model="m", provider="p", max_queue_wait_ms=500)


@pytest.mark.parametrize("policy,rule,ready,trigger,wait_s,expected", [
    ("allowed", RULE, True, Trigger.QUEUE_WAIT, 0.6, True),
    ("allowed", RULE, True, Trigger.QUEUE_WAIT, 0.4, False),
    ("allowed", RULE, True, Trigger.QUEUE_WAIT, None, False),  # unknown wait: no overflow
    ("never", RULE, True, Trigger.QUEUE_WAIT, 9.0, False),
    ("never", RULE, True, Trigger.NO_REPLICA, None, False),
    ("allowed", None, True, Trigger.NO_REPLICA, None, False),
    ("allowed", RULE, False, Trigger.NO_REPLICA, None, False),  # provider full or wrong API
    ("allowed", RULE, True, Trigger.NO_REPLICA, None, True),
    ("allowed", RULE.model_copy(update={"on_no_healthy_replica": False}), True,
     Trigger.NO_REPLICA, None, False),
    ("allowed", RULE.model_copy(update={"max_queue_wait_ms": None}), True, Trigger.QUEUE_WAIT,
     99.0, False),
])
def test_overflow_decision(policy, rule, ready, trigger, wait_s, expected):
    assert should_overflow(policy, rule, ready, trigger, wait_s) is expected


def sse(payload) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_openai_stream_meter_drops_the_usage_chunk_the_client_did_not_ask_for():
    usage = {"prompt_tokens": 9, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 4}}
    events = (sse({"choices": [{"delta": {"content": "a"}}]}) +
              sse({"choices": [{"delta": {"content": "b"}}]}))
    tail = sse({"choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    meter = StreamMeter("openai", prompt_bound=50)
    assert meter.feed(events, drop_usage=True) == events
    assert meter.usage == Usage(50, 2)  # cut short here: prompt bound + content events
    assert meter.feed(tail, drop_usage=True) == b"data: [DONE]\n\n"
    assert meter.usage == Usage(9, 2, 4)
    kept = StreamMeter("openai", 50)
    assert kept.feed(events + tail, drop_usage=False) == events + tail


def test_anthropic_stream_meter_reads_input_at_start_and_output_as_it_goes():
    meter = StreamMeter("anthropic", prompt_bound=50)
    start = sse({"type": "message_start", "message": {"usage": {
        "input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 1}}})
    delta = sse({"type": "content_block_delta", "delta": {"text": "x"}})
    assert meter.feed(start + delta + delta, drop_usage=False) == start + delta + delta
    assert meter.usage == Usage(8, 2, 3)
    meter.feed(sse({"type": "message_delta", "usage": {"output_tokens": 7}}), False)
    assert meter.usage == Usage(8, 7, 3)


def test_provider_prices_default_to_the_matching_baseline_and_may_be_overridden():
    catalog = load_pricing()
    base = catalog.baselines["gpt-5.4"]
    p = provider_price(OverflowProviderConfig(**OAI), catalog)
    assert (p.usd_per_1m_input_tokens, p.usd_per_1m_output_tokens) == (
        base.usd_per_1m_input_tokens, base.usd_per_1m_output_tokens)
    own = provider_price(OverflowProviderConfig(**{**OAI, "model": "my-model",
                                                   "usd_per_1m_input_tokens": 1.0,
                                                   "usd_per_1m_output_tokens": 2.0}), catalog)
    assert (own.usd_per_1m_input_tokens, own.usd_per_1m_cached_input_tokens,
            own.usd_per_1m_output_tokens) == (1.0, 1.0, 2.0)
    with pytest.raises(ConfigError, match="no price"):
        provider_price(OverflowProviderConfig(**{**OAI, "model": "unknown-model"}), catalog)


async def test_provider_refusing_the_gateway_key_is_a_502_that_never_shows_the_key(caplog):
    secret = "sk-very-secret-provider-key"
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"error": {"message": "bad key " + secret}})

    provider = Provider(OverflowProviderConfig(**OAI), api_key=secret,
                        transport=httpx.MockTransport(answer))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProviderError) as err:
        async for _ in provider.serve("chat.completions", b'{"model":"m","messages":[]}', 3):
            pass
    assert err.value.status_code == 502
    assert seen[0].headers["authorization"] == f"Bearer {secret}"
    assert json.loads(seen[0].content)["model"] == "gpt-5.4"
    assert secret not in str(err.value.to_openai()) + caplog.text + repr(provider)
    assert provider.inflight == 0
    await provider.aclose()


@pytest.fixture
def store(tmp_path):
    s = TenancyStore.open(f"sqlite:///{tmp_path}/t.db")
    yield s
    s.close()


def test_overflow_budget_holds_refuses_past_the_month_budget_and_settles(store):
    _, key = store.create_tenant("a", overflow_policy="allowed", overflow_budget_usd=1.0)
    principal = authenticate(store, key.plaintext)
    assert (principal.overflow_policy, principal.overflow_budget_usd) == ("allowed", 1.0)
    admit(store, principal, reservation=Reservation("r1", 10, 0.0), model="m",
          endpoint="chat.completions", stream=False, gateway_id="gw", lease_s=60)
    now = dt.datetime(2026, 5, 20)
    with store.begin() as conn:
        hold = reserve_in(conn, principal.tenant_id, "r1", "provider:oai", to_nusd(0.75), 1.0,
                          now)
        assert hold is not None
        assert reserve_in(conn, principal.tenant_id, "r2", "provider:oai", to_nusd(0.5), 1.0,
                          now) is None  # 0.75 + 0.5 > 1.0: refused, nothing written
        settle_in(conn, hold, to_nusd(0.25))
        assert spent_nusd(conn, principal.tenant_id, now) == to_nusd(0.25)
        assert reserve_in(conn, principal.tenant_id, "r2", "provider:oai", to_nusd(0.5), 1.0,
                          now) is not None
        # A new month starts from zero.
        assert spent_nusd(conn, principal.tenant_id, dt.datetime(2026, 6, 1)) == 0
    [row] = ledger.query_usage(store)
    assert row.backend == "provider:oai"


def test_metrics_count_requests_tokens_and_usd_per_backend():
    cfg = config(rules=[{"model": "fake-moe", "provider": "oai"}])
    metrics = GatewayMetrics(config=cfg)
    for backend in ("replica", "provider:oai"):
        rec = RequestRecord("r-" + backend, "fake-moe", "chat.completions", False, 200, 1000,
                            500, 0, 0.1, 0.2, backend=backend)
        metrics.record(rec, metrics.cost_model.price(rec))
    text_ = generate_latest(metrics.registry).decode()
    price = load_pricing().baselines["gpt-5.4"].usd(1000, 0, 500)
    assert 'moestack_backend_requests_total{backend="provider:oai",model="fake-moe",' \
           'status="200"} 1.0' in text_
    assert f'moestack_backend_cost_usd_total{{backend="provider:oai",model="fake-moe"}} ' \
           f'{price}' in text_
    assert 'moestack_backend_tokens_total{backend="replica",kind="completion",' \
           'model="fake-moe"} 500.0' in text_
    assert f'moestack_overflow_alternative_cost_usd_total{{model="fake-moe",provider="oai"}} ' \
           f'{2 * price}' in text_


def test_migration_0005_adds_backend_and_policy_keeping_rows_and_goes_back_down(tmp_path):
    url = f"sqlite:///{tmp_path}/m.db"
    store = TenancyStore.open(url)
    _, key = store.create_tenant("a")
    admit(store, authenticate(store, key.plaintext), reservation=Reservation("r1", 5, 0.0),
          model="m", endpoint="completions", stream=False, gateway_id="gw", lease_s=60)
    store.close()
    cfg = Config()
    cfg.set_main_option("script_location", "moestack.tenancy:migrations")
    store = TenancyStore(url)
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004_adapters")
    assert "backend" not in {c["name"] for c in inspect(store.engine).get_columns("usage_ledger")}
    assert "overflow_counters" not in inspect(store.engine).get_table_names()
    store.close()
    store = TenancyStore.open(url)  # back to head, as a gateway does at start
    with store.read() as conn:
        assert conn.execute(text("SELECT backend FROM usage_ledger")).scalars().all() == [
            "replica"]
        assert conn.execute(text("SELECT overflow_policy FROM tenants")).scalars().all() == [
            "never"]
    store.close()


def test_cost_report_splits_by_backend_with_blended_cost_and_saving(tmp_path, capsys):
    import yaml

    from moestack.cli import main

    url = f"sqlite:///{tmp_path}/r.db"
    store = TenancyStore.open(url)
    _, key = store.create_tenant("a")
    p = authenticate(store, key.plaintext)
    costs = {"r-replica": ("replica", 0.001), "r-api": ("provider:oai", 0.004)}
    for rid, (backend, cost) in costs.items():
        admit(store, p, reservation=Reservation(rid, 10, 0.0), model="fake-moe",
              endpoint="chat.completions", stream=False, gateway_id="gw", lease_s=60)
        if backend != "replica":
            with store.begin() as conn:
                reserve_in(conn, p.tenant_id, rid, backend, 1, None)
        ledger.settle(store, RequestRecord(rid, "fake-moe", "chat.completions", False, 200,
                                           1000, 500, 0, 0.1, 0.2, backend=backend),
                      charged_usd=0.0, cost_usd=cost)
    store.close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"name": "fake-moe", "engine": "fake"}], "storage": {"url": url},
        "overflow": {"providers": [OAI], "rules": [{"model": "fake-moe", "provider": "oai"}]}}))
    assert main(["cost", "report", "-c", str(cfg), "--db", url, "--by-backend"]) == 0
    out = capsys.readouterr().out
    api = 2 * load_pricing().baselines["gpt-5.4"].usd(1000, 0, 500)
    assert "provider:oai" in out and "replica" in out
    assert "overflowed: 1/2 requests; blended USD per 1M tokens: 1.6667" in out
    assert f"everything to the API: {api:.9f} USD; saving {api - 0.005:.9f} USD" in out


def test_tenants_cli_sets_and_shows_the_overflow_policy_and_refuses_unknown_ones(tmp_path,
                                                                                capsys):
    from moestack.cli import main
    from moestack.errors import InvalidRequestError

    url = f"sqlite:///{tmp_path}/cli.db"
    assert main(["tenants", "create", "t", "--models", "*", "--db", url]) == 0
    assert main(["tenants", "set-limits", "t", "--overflow", "allowed",
                 "--overflow-budget-usd", "25", "--db", url]) == 0
    capsys.readouterr()
    assert main(["tenants", "list", "--db", url]) == 0
    assert "overflow=allowed/25 USD/month" in capsys.readouterr().out
    store = TenancyStore.open(url)
    try:
        assert store.get_tenant("t").overflow_budget_usd == 25.0
        with pytest.raises(InvalidRequestError, match="overflow_policy"):
            store.set_limits("t", overflow_policy="sometimes")
        with pytest.raises(InvalidRequestError, match="cannot be cleared"):
            store.set_limits("t", overflow_policy=None)
        _, key = store.create_tenant("fresh")
        assert authenticate(store, key.plaintext).overflow_policy == "never"  # the default
    finally:
        store.close()
