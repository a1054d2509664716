"""The engine protocol's contract (the OpenAI wire format), checked on the in-package fake."""

import asyncio
import json

import pytest

from moestack.config.schema import ModelConfig
from moestack.engine import EngineRequest, build_engine
from moestack.errors import EngineUnavailableError
from moestack.testing import FakeEngine, FakeFault, fake_model


def make_engine(**overrides) -> FakeEngine:
    return build_engine(ModelConfig.model_validate(fake_model(**overrides)))


def request(body: dict, path: str = "/v1/completions", rid: str = "r1") -> EngineRequest:
    return EngineRequest(rid, path, json.dumps({"model": "fake-moe", **body}).encode())


async def collect(engine, req):
    return [c async for c in engine.serve(req)]


def events(chunks) -> list:
    text = b"".join(c.data for c in chunks).decode()
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.split("\n\n") if line]


async def test_stream_chunks_carry_cumulative_usage_and_the_head_comes_first():
    engine = make_engine()
    await engine.start()
    chunks = await collect(engine, request({"prompt": "a b c", "max_tokens": 5, "stream": True,
                                            "stream_options": {"include_usage": True}}))
    assert (chunks[0].status, chunks[0].content_type) == (200, "text/event-stream")
    assert all(c.status is None for c in chunks[1:])
    assert [c.usage.completion_tokens for c in chunks] == [1, 2, 3, 4, 5]
    assert {c.usage.prompt_tokens for c in chunks} == {3}
    got = events(chunks)
    assert "".join(e["choices"][0]["text"] for e in got[:5]) == "tok1 tok2 tok3 tok4 tok5 "
    assert got[4]["choices"][0]["finish_reason"] == "length"
    assert got[5]["usage"]["completion_tokens"] == 5 and got[6] == "[DONE]"


async def test_whole_answer_is_one_chunk_with_usage():
    engine = make_engine()
    await engine.start()
    (chunk,) = await collect(engine, request(
        {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "n": 2},
        "/v1/chat/completions"))
    body = json.loads(chunk.data)
    assert [c["message"]["content"] for c in body["choices"]] == ["tok1 tok2 "] * 2
    assert body["usage"]["completion_tokens"] == chunk.usage.completion_tokens == 4


async def test_stop_sequence_ends_with_stop():
    engine = make_engine()
    await engine.start()
    (chunk,) = await collect(engine, request({"prompt": "x", "max_tokens": 50, "stop": "tok3"}))
    choice = json.loads(chunk.data)["choices"][0]
    assert choice["finish_reason"] == "stop" and chunk.usage.completion_tokens == 3


async def test_prompt_longer_than_context_is_a_400_answer_before_generating():
    engine = make_engine(max_model_len=16)
    await engine.start()
    (chunk,) = await collect(engine, request({"prompt": "w " * 20, "max_tokens": 1}))
    assert chunk.status == 400 and b"maximum context length is 16" in chunk.data
    assert engine.requests_seen == [] and chunk.usage.completion_tokens == 0


async def test_max_tokens_defaults_to_the_rest_of_the_context():
    engine = make_engine(max_model_len=16)
    await engine.start()
    (chunk,) = await collect(engine, request({"prompt": "a b c d"}))
    assert chunk.usage.completion_tokens == 12


async def test_injected_fault_raises_engine_unavailable_after_n_tokens():
    engine = make_engine()
    await engine.start()
    engine.fault = FakeFault(after_tokens=2)
    got = []
    with pytest.raises(EngineUnavailableError):
        async for chunk in engine.serve(request({"prompt": "x", "stream": True})):
            got.append(chunk)
    assert len(got) == 2


async def test_closing_the_stream_aborts_the_request():
    engine = make_engine(fake={"token_interval_s": 0.01})
    await engine.start()
    stream = engine.serve(request({"prompt": "x", "max_tokens": 100, "stream": True}, rid="r9"))
    await anext(stream)
    await stream.aclose()
    assert engine.aborted == ["r9"]
    assert engine.stats().running_requests == 0


async def test_stopped_engine_is_unhealthy():
    engine = make_engine()
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
    await engine.start()
    await engine.check_health()


async def test_info_lists_the_routes_and_fields_it_reads():
    engine = make_engine()
    await engine.start()
    fields = engine.info.request_fields
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize"} <= set(fields)
    assert "messages" in fields["/v1/chat/completions"] and "logprobs" not in fields[
        "/v1/chat/completions"]


async def test_ttft_delay_is_honoured():
    engine = make_engine(fake={"ttft_s": 0.05})
    await engine.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await anext(engine.serve(request({"prompt": "x", "max_tokens": 1, "stream": True})))
    assert loop.time() - t0 >= 0.05
