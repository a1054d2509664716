"""Bounds on one request's shape (fake engine, SQLite): 400s naming the field, checked after model
access and before any reservation or ledger write."""

import json

import pytest
from sqlalchemy import text

from moestack.api.endpoints import MAX_JSON_DEPTH, check_limits, endpoint_at, read_body
from moestack.errors import InvalidRequestError
from moestack.tenancy import query_usage
from moestack.tenancy.admission import MAX_RESERVATION_NUSD, MAX_RESERVATION_TOKENS, Reservation
from moestack.tenancy import Tenancy
from moestack.tenancy.store import TenancyStore
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

MODEL, NARROW, HIDDEN = "fake-moe", "fake-narrow", "fake-hidden"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def stack(tmp_path):
    config = fake_config(
        fake_model(MODEL), fake_model(HIDDEN),
        fake_model(NARROW, request_limits={"max_n": 2, "max_prompts_per_request": 3,
                                           "max_completion_tokens": 8, "max_top_logprobs": 2,
                                           "max_json_depth": 8}),
        storage={"url": f"sqlite:///{tmp_path}/t.db"},
        tenancy={"enabled": True, "auth_cache_ttl_s": 0})
    async with local_stack(config) as s:
        _, key = s.tenancy.store.create_tenant("acme", allowed_models=[MODEL, NARROW])
        s.headers = {"Authorization": f"Bearer {key.plaintext}",
                     "content-type": "application/json"}
        yield s


async def post(stack, path, body, model=MODEL):
    raw = body if isinstance(body, (bytes, str)) else json.dumps({"model": model, **body})
    return await stack.http.post(path, content=raw, headers=stack.headers)


def written(stack):
    """Ledger rows and the tenant's in-flight counter, once queued writes are done."""
    stack.tenancy.writer.flush()
    with stack.tenancy.store.read() as conn:
        inflight = conn.execute(text("SELECT SUM(inflight) FROM tenant_counters")).scalar()
    return len(query_usage(stack.tenancy.store)), inflight


def nested(depth):
    """A ``stop`` value nested ``depth`` - 1 levels inside the body (the body is level 1)."""
    return json.loads("[" * (depth - 1) + "]" * (depth - 1))


def options(depth):
    """A ``stream_options`` value (the fake engine reads only ``include_usage`` of it) that
    makes the body ``depth`` levels deep."""
    return {"include_usage": False, "x": nested(depth - 1)}


BAD = [  # (path, raw body or fields, param named by the 400)
    ("/v1/completions", '{"model": "fake-moe", "prompt": "hi", "n": 1e400}', "n"),
    ("/v1/completions", {"prompt": "hi", "n": 10**15}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 70000}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": -1}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": True}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2.0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 1000}, "n"),
    ("/v1/completions", {"prompt": [[1]] * 65, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 100_000, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, "max_tokens"),
    ("/v1/completions", '{"model": "fake-moe", "prompt": "hi", "max_tokens": 1e400}',
     "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -5},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 10**9},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": "all"}, "top_logprobs"),
    ("/v1/completions", '{"model": "fake-moe", "prompt": "hi", "temperature": NaN}',
     "temperature"),
    ("/v1/completions", '{"model": "fake-moe", "prompt": "hi", "logit_bias": {"7": -1e999}}',
     "logit_bias.7"),
    ("/v1/completions", {"prompt": "hi", "kv_transfer_params": {"remote_host": "10.0.0.1"}},
     "kv_transfer_params"),
    ("/v1/chat/completions", {"messages": CHAT, "ec_transfer_params": {}}, "ec_transfer_params"),
    ("/v1/responses", {"input": "hi", "background": True}, "background"),
    ("/v1/completions", {"prompt": "hi", "stop": nested(65)}, None),
    ("/v1/completions", '{"model": "fake-moe", "prompt": "hi", "stop": %s}'
     % ("[" * 5000 + "]" * 5000), None),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}-{i}" for i, (p, _, p2)
                                                      in enumerate(BAD)])
async def test_extreme_or_malformed_fields_get_400_naming_them_and_write_nothing(
        stack, path, body, param):
    r = await post(stack, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and (param is None or param.split(".")[0] in error["message"])
    assert written(stack) == (0, 0)


async def test_limits_are_per_model_and_requests_within_them_are_served(stack):
    ok = await post(stack, "/v1/completions", {"prompt": ["a b"] * 3, "n": 2, "max_tokens": 8},
                    model=NARROW)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 6
    for body, param in (({"prompt": ["a b"] * 4, "max_tokens": 1}, "prompt"),
                        ({"prompt": "a", "n": 3, "max_tokens": 1}, "n"),
                        ({"prompt": "a", "max_tokens": 9}, "max_tokens"),
                        ({"prompt": "a", "max_tokens": 1, "stream_options": options(9)},
                         None)):
        r = await post(stack, "/v1/completions", body, model=NARROW)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
        assert r.json()["error"]["code"] in ("limit_exceeded", "json_too_deep")
    # The defaults of another model take what NARROW refuses.
    r = await post(stack, "/v1/completions", {"prompt": ["a b"] * 4, "n": 3, "max_tokens": 9,
                                              "stream_options": options(64)})
    assert r.status_code == 200 and len(r.json()["choices"]) == 12
    assert written(stack) == (2, 0)


async def test_a_hidden_model_is_404_like_a_missing_one_whatever_the_body_asks(stack):
    for extra in ({"unknown_field": 1}, {"n": 100}, {"max_tokens": 10**6}, {"prompt": ["a"] * 99},
                  {"stop": nested(100)}):
        body = {"prompt": "hi", **extra}
        hidden = await post(stack, "/v1/completions", body, model=HIDDEN)
        missing = await post(stack, "/v1/completions", body, model="no-such-model")
        assert hidden.status_code == missing.status_code == 404, extra
        assert (hidden.json()["error"]["message"].replace(HIDDEN, "X")
                == missing.json()["error"]["message"].replace("no-such-model", "X"))
    # An endpoint the hidden model's engine does not serve says nothing either.
    r = await post(stack, "/v1/embeddings", {"input": "hi"}, model=HIDDEN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await post(stack, "/v1/completions", {"prompt": "hi", "unknown_field": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"


def test_read_body_bounds_depth_before_any_recursive_walk():
    endpoint = endpoint_at("/v1/chat/completions")
    deep = {"model": "m", "messages": CHAT, "tools": nested(MAX_JSON_DEPTH)}
    facts, _ = read_body(endpoint, json.dumps(deep).encode())
    assert facts.json_depth == MAX_JSON_DEPTH
    deeper = {"model": "m", "messages": CHAT, "tools": nested(MAX_JSON_DEPTH + 1)}
    with pytest.raises(InvalidRequestError) as err:
        read_body(endpoint, json.dumps(deeper).encode())
    assert err.value.code == "json_too_deep"


def test_the_largest_logprobs_count_of_a_request_is_the_one_checked():
    endpoint = endpoint_at("/v1/completions")
    facts, _ = read_body(endpoint, b'{"model": "m", "prompt": "a", "logprobs": 3, '
                                   b'"prompt_logprobs": 7}')
    assert (facts.logprobs, facts.logprobs_field) == (7, "prompt_logprobs")
    facts, _ = read_body(endpoint, b'{"model": "m", "prompt": "a", "logprobs": -1, '
                                   b'"prompt_logprobs": 7}')
    assert (facts.logprobs, facts.logprobs_field) == (-1, "logprobs")


def test_reservation_at_the_widest_limits_is_refused_before_it_could_overflow():
    # A 10M-token context with the schema's largest n and prompt count: the reservation would
    # be 2.6e12 tokens; it is refused (400), never written.
    config = fake_config(fake_model(MODEL, max_model_len=10_000_000, request_limits={
        "max_n": 128, "max_prompts_per_request": 2048}), tenancy={"enabled": True})
    tenancy = Tenancy(config, TenancyStore.open("sqlite:///:memory:"))
    endpoint = endpoint_at("/v1/completions")
    widest = json.dumps({"model": MODEL, "prompt": [[1]] * 2048, "n": 128}).encode()
    facts, _ = read_body(endpoint, widest)
    check_limits(endpoint, facts, config.model(MODEL).request_limits)
    with pytest.raises(InvalidRequestError) as err:
        tenancy.reservation(MODEL, facts.token_bound(10_000_000), "r", facts.budget_field)
    assert err.value.code == "reservation_too_large"
    assert 10_000_000 * 2048 * 129 < 2**63  # what it would have been fits 64 bits anyway
    fits, _ = read_body(endpoint, json.dumps({"model": MODEL, "prompt": [[1]] * 2048, "n": 50,
                                              "max_tokens": 10_000}).encode())
    assert tenancy.reservation(MODEL, fits.token_bound(10_000_000), "r").tokens == (
        2048 * 2 + 2048 * 50 * 10_000)
    tenancy.store.close()


def test_reservation_size_bounds():
    Reservation("r", MAX_RESERVATION_TOKENS, MAX_RESERVATION_NUSD / 1e9).check_size()
    for tokens, usd in ((MAX_RESERVATION_TOKENS + 1, 1.0),
                        (10, MAX_RESERVATION_NUSD / 1e9 * 1.01), (10, float("inf"))):
        with pytest.raises(InvalidRequestError) as err:
            Reservation("r", tokens, usd).check_size("max_tokens")
        assert err.value.code == "reservation_too_large" and err.value.param == "max_tokens"


async def test_a_reservation_too_large_for_the_counters_is_a_400_before_any_write(tmp_path):
    # A price nobody would set: one request could reserve more than the counters may sum.
    config = fake_config(fake_model(MODEL, max_model_len=100_000),
                         storage={"url": f"sqlite:///{tmp_path}/t.db"},
                         tenancy={"enabled": True, "default_price": {
                             "usd_per_1m_completion_tokens": 1e12}})
    async with local_stack(config) as s:
        _, key = s.tenancy.store.create_tenant("acme")
        s.headers = {"Authorization": f"Bearer {key.plaintext}"}
        r = await post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 50_000, "n": 16})
        assert r.status_code == 400 and r.json()["error"]["code"] == "reservation_too_large"
        assert r.json()["error"]["param"] == "max_tokens"
        assert written(s) == (0, 0)
