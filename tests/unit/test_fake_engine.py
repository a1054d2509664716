"""The engine protocol's contract, checked on the in-package fake engine."""

import asyncio

import pytest

from moestack.config.schema import ModelConfig
from moestack.engine import GenerationRequest, SamplingOptions, build_engine
from moestack.engine.protocol import ChatMessage, check_fits_context
from moestack.errors import EngineUnavailableError, PromptTooLongError
from moestack.testing import FakeEngine, FakeFault, fake_model


def make_engine(**overrides) -> FakeEngine:
    return build_engine(ModelConfig.model_validate(fake_model(**overrides)))


async def collect(engine, request):
    return [c async for c in engine.generate(request)]


async def test_chunks_are_deltas_with_cumulative_usage_and_one_finish():
    engine = make_engine()
    await engine.start()
    chunks = await collect(engine, GenerationRequest(
        "r1", prompt="a b c", sampling=SamplingOptions(max_tokens=5)))
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4, 5]
    assert {c.prompt_tokens for c in chunks} == {3}
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert "".join(c.text for c in chunks) == "tok1 tok2 tok3 tok4 tok5 "


async def test_stop_sequence_ends_with_stop():
    engine = make_engine()
    await engine.start()
    chunks = await collect(engine, GenerationRequest(
        "r", prompt="x", sampling=SamplingOptions(max_tokens=50, stop=("tok3",))))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 3


async def test_rejects_prompt_longer_than_context_before_generating():
    engine = make_engine(max_model_len=16)
    await engine.start()
    with pytest.raises(PromptTooLongError, match="maximum context length is 16") as info:
        await collect(engine, GenerationRequest("r", prompt="w " * 20))
    assert info.value.param == "prompt"
    assert engine.requests_seen == []
    with pytest.raises(PromptTooLongError, match=r"requested 21 tokens \(4 in the prompt"):
        await collect(engine, GenerationRequest(
            "r", messages=(ChatMessage("user", "a"),), sampling=SamplingOptions(max_tokens=17)))


def test_max_tokens_defaults_to_the_rest_of_the_context():
    assert check_fits_context(10, None, 64) == 54
    assert check_fits_context(10, 54, 64) == 54


async def test_injected_fault_raises_engine_unavailable_after_n_tokens():
    engine = make_engine()
    await engine.start()
    engine.fault = FakeFault(after_tokens=2)
    got = []
    with pytest.raises(EngineUnavailableError):
        async for chunk in engine.generate(GenerationRequest("r", prompt="x")):
            got.append(chunk)
    assert len(got) == 2


async def test_closing_the_stream_aborts_the_request():
    engine = make_engine(fake={"token_interval_s": 0.01})
    await engine.start()
    stream = engine.generate(GenerationRequest("r9", prompt="x", sampling=SamplingOptions(
        max_tokens=100)))
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


def test_request_needs_exactly_one_prompt_form():
    with pytest.raises(ValueError):
        GenerationRequest("r")
    with pytest.raises(ValueError):
        GenerationRequest("r", prompt="a", prompt_token_ids=(1,))


async def test_ttft_delay_is_honoured():
    engine = make_engine(fake={"ttft_s": 0.05})
    await engine.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stream = engine.generate(GenerationRequest("r", prompt="x", sampling=SamplingOptions(
        max_tokens=1)))
    await anext(stream)
    assert loop.time() - t0 >= 0.05
