"""vLLM's own serving layer inside the engine protocol, in-process, on the embedded default's tiny
model (or the one ``MOESTACK_TEST_TINY_ARCH`` names, as in tests/integration/test_stack.py).

The usage the engine meters must equal the usage vLLM reports, on every endpoint, and closing a
stream must abort the request in the engine.
"""

import asyncio
import json

import pytest
import pytest_asyncio

from moestack.config.schema import ModelConfig
from moestack.engine import build_engine
from moestack.engine.asgi import carries_output
from moestack.errors import ConfigError
from moestack.testing.configs import default_tiny_arch, tiny_model
from moestack.testing.requests import engine_request

pytestmark = pytest.mark.integration

ARCH = default_tiny_arch()
MODEL = f"tiny-{ARCH}"


def model_config(**overrides) -> ModelConfig:
    return ModelConfig.model_validate(tiny_model(
        ARCH, **{"max_model_len": 512, "engine_args": {"enforce_eager": True}, **overrides}))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    eng = build_engine(model_config())
    await eng.start()
    yield eng
    eng.stop()


async def answer(engine, path, body):
    chunks = [c async for c in engine.serve(engine_request({"model": MODEL, **body}, path))]
    return chunks, b"".join(c.data for c in chunks)


def sse_json(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.decode().split("\n")
            if line.startswith("data: {")]


CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6}


@pytest.mark.asyncio(loop_scope="module")
async def test_metered_usage_equals_vllms_usage_on_chat_and_completions(engine):
    chunks, data = await answer(engine, "/v1/chat/completions", {**CHAT, "n": 2})
    usage = json.loads(data)["usage"]
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens) == (usage["prompt_tokens"],
                                                       usage["completion_tokens"])
    assert usage["completion_tokens"] == 12
    chunks, data = await answer(engine, "/v1/completions",
                                {"prompt": ["one two", "three"], "max_tokens": 3})
    usage = json.loads(data)["usage"]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        usage["prompt_tokens"], usage["completion_tokens"]) and usage["completion_tokens"] == 6


@pytest.mark.asyncio(loop_scope="module")
async def test_metered_usage_equals_vllms_usage_on_responses_and_messages(engine):
    chunks, data = await answer(engine, "/v1/responses",
                                {"input": "Hello", "max_output_tokens": 5, "stream": True})
    done = [e for e in sse_json(data) if e.get("type") == "response.completed"][0]
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens) == (
        done["response"]["usage"]["input_tokens"], done["response"]["usage"]["output_tokens"])
    assert chunks[0].content_type.startswith("text/event-stream")
    chunks, data = await answer(engine, "/v1/messages", CHAT)
    usage = json.loads(data)["usage"]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        usage["input_tokens"], usage["output_tokens"])


@pytest.mark.asyncio(loop_scope="module")
async def test_engine_errors_are_vllms_own_answers(engine):
    chunks, data = await answer(engine, "/v1/chat/completions", {**CHAT, "max_tokens": 600})
    assert chunks[0].status == 400 and b"max_model_len" in data
    assert chunks[-1].usage.completion_tokens == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"prompt": "Once upon a time"}),
    ("/v1/responses", {"input": "Once upon a time"}),
    ("/v1/messages", CHAT),
])
@pytest.mark.asyncio(loop_scope="module")
async def test_closing_a_stream_aborts_the_request_in_the_engine(engine, path, body):
    budget = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    stream = engine.serve(engine_request(
        {"model": MODEL, **body, budget: 400, "stream": True, "ignore_eos": True}
        if path != "/v1/responses" else {"model": MODEL, **body, budget: 400, "stream": True},
        path))
    seen = 0
    async for chunk in stream:
        seen += 1
        if chunk.usage.completion_tokens >= 3:
            break
    await stream.aclose()
    processor = engine._llm.output_processor
    for _ in range(50):
        if processor.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert processor.get_num_unfinished_requests() == 0
    assert 3 <= chunk.usage.completion_tokens < 400
    assert engine.stats().running_requests == 0


def events(data: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in data.split(b"\n\n") if e.strip()]


def has_text(event: bytes) -> bool:
    """Output text by each route's own shape (chat, completions, Responses, Anthropic)."""
    e = sse_json(event)[0] if sse_json(event) else {}
    choice = (e.get("choices") or [{}])[0]
    return bool((choice.get("delta") or {}).get("content") or choice.get("text")
                or (e.get("type") == "response.output_text.delta" and e.get("delta"))
                or (e.get("type") == "content_block_delta" and (e.get("delta") or {}).get("text")))


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6}),
    ("/v1/responses", {"input": "Once upon a time", "max_output_tokens": 6}),
    ("/v1/messages", CHAT),
])
@pytest.mark.asyncio(loop_scope="module")
async def test_stream_batching_tells_vllms_output_events_from_the_rest(engine, path, body):
    # Pieces go at once until one carries output, then batch: the check must see vLLM's first
    # output event as output, and its role chunk and the envelopes before it as not.
    extra = {} if path == "/v1/responses" else {"ignore_eos": True}
    _, data = await answer(engine, path, {**body, **extra, "stream": True})
    evs = events(data)
    first = next(i for i, e in enumerate(evs) if has_text(e))
    assert carries_output(evs[first]), evs[first]
    assert not any(carries_output(e) for e in evs[:first]), evs[:first]


@pytest.mark.asyncio(loop_scope="module")
async def test_info_lists_vllms_routes_and_their_fields(engine):
    fields = engine.info.request_fields
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                  "/tokenize", "/detokenize"):
        assert route in fields
    assert {"logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice",
            "response_format", "n", "priority"} <= fields["/v1/chat/completions"]
    assert "echo" in fields["/v1/completions"]


def test_unknown_engine_argument_fails_at_start():
    with pytest.raises(ConfigError, match="unknown vLLM engine argument"):
        asyncio.run(build_engine(model_config(engine_args={"no_such_arg": 1})).start())
