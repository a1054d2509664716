"""The OpenAI API over fake engines, driven with the official `openai` client in-process."""

import json

import openai
import pytest

from moestack.usage import RequestRecord
from moestack.testing import FakeFault, fake_config, fake_model
from moestack.testing.local_api import local_stack

MODEL = "fake-moe"


class Recorder:
    def __init__(self):
        self.records: list[RequestRecord] = []

    def record(self, rec: RequestRecord) -> None:
        self.records.append(rec)


@pytest.fixture
async def stack():
    recorder = Recorder()
    config = fake_config(fake_model(MODEL), gateway={"max_body_bytes": 4096})
    async with local_stack(config, sinks=[recorder]) as s:
        s.recorder = recorder
        yield s


async def test_chat_completion_returns_text_and_usage(stack):
    client = stack.openai()
    resp = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=3)
    assert resp.choices[0].message.content == "tok1 tok2 tok3 "
    assert resp.choices[0].finish_reason == "length"
    # "<|user|> hello there <|end|> <|assistant|>" is five fake tokens.
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 3)
    assert resp.usage.total_tokens == 8
    assert resp.id.startswith("chatcmpl-")


async def test_max_completion_tokens_wins_over_max_tokens(stack):
    resp = await stack.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=9,
        max_completion_tokens=2)
    assert resp.usage.completion_tokens == 2


async def test_completion_and_token_id_prompts(stack):
    client = stack.openai()
    resp = await client.completions.create(model=MODEL, prompt="one two", max_tokens=2)
    assert resp.choices[0].text == "tok1 tok2 "
    assert resp.usage.prompt_tokens == 2
    resp = await client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1)
    assert resp.usage.prompt_tokens == 3


async def test_streamed_chat_sends_role_first_and_usage_last(stack):
    stream = await stack.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok1 tok2 tok3 tok4 "
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


async def test_streamed_completion_without_usage_option_has_no_usage_chunk(stack):
    stream = await stack.openai().completions.create(model=MODEL, prompt="x", max_tokens=2,
                                                     stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


async def test_lists_and_gets_models(stack):
    client = stack.openai()
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_unknown_model_is_404_model_not_found(stack):
    with pytest.raises(openai.NotFoundError) as info:
        await stack.openai().chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert stack.recorder.records == []


@pytest.mark.parametrize("body,needle,param", [
    (b"{not json", "not valid JSON", None),
    (b"\xff\xfe{}", "not valid UTF-8", None),
    (b"[1, 2]", "must be a JSON object", None),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "`model`", "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "n": 0}).encode(), "`n`", "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": "9"}).encode(), "`max_tokens`", "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "stream": "yes"}).encode(), "`stream`", "stream"),
    (b'{"model": "fake-moe", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "invalid Unicode", "messages[0].content"),
])
async def test_bodies_the_gateway_cannot_read_are_400_naming_the_field(stack, body, needle,
                                                                        param):
    r = await stack.http.post("/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    assert err["param"] == param
    assert stack.recorder.records == []


async def test_a_field_the_engine_would_ignore_is_400_naming_it(stack):
    with pytest.raises(openai.BadRequestError) as info:
        await stack.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
            extra_body={"frobnicate": 1, "logit_bias": {"5": 100}})
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == "frobnicate"
    assert "`frobnicate`, `logit_bias`" in info.value.message
    assert stack.engines[MODEL].requests_seen == []


async def test_engine_errors_are_relayed_with_their_status_and_recorded(stack):
    with pytest.raises(openai.BadRequestError) as info:
        await stack.openai().completions.create(model=MODEL, prompt="w " * 300, max_tokens=5)
    assert "maximum context length" in info.value.message
    assert info.value.status_code == 400
    (rec,) = stack.recorder.records
    assert (rec.status_code, rec.prompt_tokens, rec.completion_tokens) == (400, 0, 0)


async def test_n_choices_and_list_prompts_are_relayed_and_counted(stack):
    client = stack.openai()
    resp = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 6
    resp = await client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=2)
    assert len(resp.choices) == 2 and resp.usage.prompt_tokens == 3
    assert [(r.prompt_tokens, r.completion_tokens) for r in stack.recorder.records] == \
        [(4, 6), (3, 4)]


async def test_priority_is_the_gateways_whatever_the_client_sends(stack):
    await stack.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
        extra_body={"priority": -100})
    assert stack.engines[MODEL].requests_seen[-1].priority == 0


async def test_body_is_relayed_as_sent(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "temperature": 0.3, "seed": 7, "stop": ["zz"], "user": "u1"}
    r = await stack.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert stack.engines[MODEL].requests_seen[-1].body == {**body, "priority": 0}
    assert r.headers["x-moestack-request-id"] == stack.recorder.records[-1].request_id


async def test_streamed_usage_is_the_engines_even_without_the_usage_option(stack):
    stream = await stack.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True)
    async for _ in stream:
        pass
    (rec,) = stack.recorder.records
    assert (rec.prompt_tokens, rec.completion_tokens, rec.stream) == (4, 3, True)


async def test_route_a_model_does_not_serve_is_404(stack):
    r = await stack.http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_endpoint"


async def test_tokenize_is_relayed(stack):
    r = await stack.http.post("/tokenize", json={"model": MODEL, "prompt": "a b c"})
    assert r.status_code == 200 and r.json()["count"] == 3
    assert stack.recorder.records[-1].endpoint == "tokenize"


async def test_oversized_body_is_413(stack):
    r = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 5000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


async def test_oversized_body_without_content_length_is_413(stack):
    async def chunks():
        for _ in range(10):
            yield b"x" * 1000
    r = await stack.http.post("/v1/completions", content=chunks(),
                              headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_engine_failure_before_first_token_is_503(stack):
    stack.engines[MODEL].fault = FakeFault(after_tokens=0)
    with pytest.raises(openai.InternalServerError) as info:
        await stack.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503
    assert stack.recorder.records[-1].status_code == 503


async def test_engine_failure_mid_stream_is_an_error_event_and_is_recorded(stack):
    stack.engines[MODEL].fault = FakeFault(after_tokens=2)
    stream = await stack.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="injected engine failure"):
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 2
    (rec,) = stack.recorder.records
    assert (rec.status_code, rec.completion_tokens) == (503, 2)


async def test_every_request_is_recorded_once_with_its_usage(stack):
    client = stack.openai()
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                         max_tokens=2)
    stream = await client.completions.create(model=MODEL, prompt="a b", max_tokens=3,
                                             stream=True)
    async for _ in stream:
        pass
    recs = stack.recorder.records
    assert [(r.endpoint, r.stream, r.status_code, r.prompt_tokens, r.completion_tokens)
            for r in recs] == [("chat.completions", False, 200, 4, 2),
                               ("completions", True, 200, 2, 3)]
    assert all(r.ttft_s is not None and r.e2e_s >= r.ttft_s for r in recs)


async def test_health_reports_unhealthy_engines(stack):
    assert (await stack.http.get("/health")).json() == {"status": "ok"}
    stack.engines[MODEL].healthy = False
    r = await stack.http.get("/health")
    assert r.status_code == 503 and MODEL in r.json()["models"]


async def test_metrics_count_requests_and_tokens(stack):
    await stack.openai().completions.create(model=MODEL, prompt="a b", max_tokens=3)
    text = (await stack.operator.get("/metrics")).text
    assert f'moestack_requests_total{{endpoint="completions",model="{MODEL}",status="200"}} 1.0' \
        in text
    assert f'moestack_tokens_total{{kind="completion",model="{MODEL}"}} 3.0' in text


async def test_unknown_route_is_openai_shaped_404(stack):
    r = await stack.http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


async def test_errors_on_the_anthropic_routes_are_anthropic_shaped(stack):
    r = await stack.http.post("/v1/messages", json={"model": "nope", "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert r.json() == {"type": "error", "error": {
        "type": "not_found_error", "message": r.json()["error"]["message"]}}
    r = await stack.http.post("/v1/messages", content=b"{oops",
                              headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
