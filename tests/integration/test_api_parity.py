"""API parity with vLLM's own server, through the whole stack with tenancy on.

`moestack up` on the embedded default's tiny model (or the one ``MOESTACK_TEST_TINY_ARCH`` names, as
in tests/integration/test_stack.py), driven with the official `openai` and `anthropic`
clients: every parameter vLLM's server honours must work the same through moestack, usage must be
vLLM's own count, and every request leaves exactly one ledger row naming its endpoint.
"""

import json
import shutil
import time

import anthropic
import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from moestack.testing.configs import default_tiny_arch, tiny_model
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

pytestmark = pytest.mark.integration

ARCH = default_tiny_arch()
MODEL = f"tiny-{ARCH}"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def stack():
    tmp = short_temp_dir()
    config = {
        "models": [tiny_model(
            ARCH, max_model_len=2048,  # as the embedded default: a whitespace-padded tool call fits
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
            serving={"tool_call_parser": "hermes"}, engine_args={"enforce_eager": True})],
        # Direct ingress, as the embedded default runs (tests/integration/test_stack.py: the proxy)
        "gateway": {"host": "127.0.0.1", "port": free_port(), "first_token_timeout_s": 120,
                    "ingress": "direct"},
        "storage": {"url": f"sqlite:///{tmp / 'moestack.db'}"},
        "tenancy": {"enabled": True, "bootstrap_tenant": "default"},
        "ray": {"num_cpus": 2},
    }
    s = start_stack(config, tmp)
    s.db = create_engine(f"sqlite:///{tmp / 'moestack.db'}")
    s.key = s.bootstrap_key()
    yield s
    s.db.dispose()
    s.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0, timeout=120)


def ledger_row(stack, request_id: str, settled: bool = True, timeout_s: float = 20.0) -> dict:
    """The ledger row of ``request_id`` once it is settled (x-moestack-request-id)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with stack.db.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(text(
                "SELECT * FROM usage_ledger WHERE request_id = :r"), {"r": request_id})]
        if rows and (rows[0]["state"] == "settled" or not settled):
            assert len(rows) == 1
            return rows[0]
        assert time.monotonic() < deadline, f"no settled ledger row for {request_id}"
        time.sleep(0.2)


def request_id(raw) -> str:
    return raw.headers["x-moestack-request-id"]


def check_usage(stack, raw, endpoint: str, prompt: int, completion: int) -> dict:
    row = ledger_row(stack, request_id(raw))
    assert (row["endpoint"], row["status_code"]) == (endpoint, 200)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    return row


def test_n_choices_are_all_generated_and_billed(stack, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=5, n=2, temperature=1.0)
    resp = raw.parse()
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 10
    check_usage(stack, raw, "chat.completions", resp.usage.prompt_tokens, 10)


def test_logprobs_with_top_logprobs(stack, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=3)
    resp = raw.parse()
    content = resp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    check_usage(stack, raw, "chat.completions", resp.usage.prompt_tokens, 4)


def test_json_schema_response_parses(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=80,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "trip", "schema": schema, "strict": True}})
    data = json.loads(resp.choices[0].message.content)
    assert set(data) == {"city", "days"} and isinstance(data["days"], int)


def test_named_tool_choice_returns_a_parsed_call_and_a_tool_result_turn_renders(client):
    # `strict: true` pins the arguments to the schema (vLLM's --tool-strict-level auto).
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 10}},
                       "required": ["city"], "additionalProperties": False}}}]
    resp = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=400, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    history = HELLO + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    follow = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4,
                                            tools=tools)
    assert follow.usage.prompt_tokens > resp.usage.prompt_tokens
    assert follow.choices[0].finish_reason in ("length", "stop")


def tokenize(stack, **body) -> httpx.Response:
    """vLLM's /tokenize (at the root, beside /v1, as vLLM serves it)."""
    return httpx.post(stack.base_url.removesuffix("/v1") + "/tokenize", timeout=60,
                      json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {stack.key}"})


def test_logit_bias_takes_effect(stack, client):
    token = tokenize(stack, prompt=" the", add_special_tokens=False).json()["tokens"][-1]
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=6,
                                     logit_bias={str(token): 100}, temperature=1.0)
    ids = tokenize(stack, prompt=resp.choices[0].text, add_special_tokens=False).json()
    assert ids["tokens"] == [token] * 6


def test_echo_returns_the_prompt_first(client):
    resp = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True)
    assert resp.choices[0].text.startswith("Echo me")


def test_list_prompts_get_one_choice_each_and_are_billed_together(stack, client):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=["First prompt", "Second one", "Third"], max_tokens=3)
    resp = raw.parse()
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 9
    check_usage(stack, raw, "completions", resp.usage.prompt_tokens, 9)


def test_responses_api_plain_and_streamed(stack, client):
    raw = client.responses.with_raw_response.create(model=MODEL, input="Hello",
                                                     max_output_tokens=6)
    resp = raw.parse()
    assert resp.status in ("completed", "incomplete") and resp.output_text is not None
    check_usage(stack, raw, "responses", resp.usage.input_tokens, resp.usage.output_tokens)
    with client.responses.with_streaming_response.create(
            model=MODEL, input="Hello", max_output_tokens=6, stream=True) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        rid = r.headers["x-moestack-request-id"]
    done = [e for e in events if e["type"] == "response.completed"][-1]["response"]
    row = ledger_row(stack, rid)
    assert (row["endpoint"], row["stream"]) == ("responses", True)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        done["usage"]["input_tokens"], done["usage"]["output_tokens"])


def test_anthropic_messages_with_x_api_key(stack):
    client = anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"),
                                 api_key=stack.key, max_retries=0, timeout=120)
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=6, messages=HELLO)
    msg = raw.parse()
    assert msg.role == "assistant" and msg.content[0].type == "text"
    check_usage(stack, raw, "messages", msg.usage.input_tokens, msg.usage.output_tokens)
    with client.messages.stream(model=MODEL, max_tokens=5, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 5


def test_anthropic_errors_are_anthropic_shaped(stack):
    bad = anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"), api_key="nope",
                              max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"


def test_tokenize_and_detokenize(stack):
    r = tokenize(stack, prompt="hello world")
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) > 0
    assert ledger_row(stack, r.headers["x-moestack-request-id"])["endpoint"] == "tokenize"
    back = httpx.post(stack.base_url.removesuffix("/v1") + "/detokenize", timeout=60,
                      json={"model": MODEL, "tokens": tokens},
                      headers={"Authorization": f"Bearer {stack.key}"}).json()
    assert "hello world" in back["prompt"]


def test_an_unsupported_field_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                       extra_body={"not_a_vllm_field": 1})
    assert info.value.code == "unsupported_parameter" and "not_a_vllm_field" in str(info.value)


STREAMS = [
    ("/chat/completions", "chat.completions",
     {"messages": HELLO, "max_tokens": 600, "ignore_eos": True, "stream": True}),
    ("/completions", "completions",
     {"prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True, "stream": True}),
    ("/responses", "responses", {"input": "Once upon a time", "max_output_tokens": 600,
                                 "stream": True}),
    ("/messages", "messages", {"messages": HELLO, "max_tokens": 600, "stream": True}),
]


@pytest.mark.parametrize("path,endpoint,body", STREAMS, ids=[s[1] for s in STREAMS])
def test_client_disconnect_mid_stream_is_billed_once_for_what_ran(stack, path, endpoint, body):
    with httpx.stream("POST", stack.base_url + path, json={"model": MODEL, **body}, timeout=60,
                      headers={"Authorization": f"Bearer {stack.key}"}) as r:
        assert r.status_code == 200
        rid = r.headers["x-moestack-request-id"]
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break
    row = ledger_row(stack, rid)
    assert (row["endpoint"], row["status_code"]) == (endpoint, 499)
    assert 0 < row["completion_tokens"] < 600 and row["prompt_tokens"] > 0
    time.sleep(1.0)  # a late second settle would show up as a changed or second row by now
    with stack.db.connect() as c:
        again = [dict(r._mapping) for r in c.execute(
            text("SELECT * FROM usage_ledger WHERE request_id = :r"), {"r": rid})]
    assert again == [row]
