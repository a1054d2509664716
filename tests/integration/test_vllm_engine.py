"""The vLLM engine implementation against the engine protocol, in-process, tiny Mixtral."""

import pytest
import pytest_asyncio

from moestack.config.schema import ModelConfig
from moestack.engine import GenerationRequest, SamplingOptions, build_engine
from moestack.engine.protocol import ChatMessage
from moestack.errors import ConfigError, PromptTooLongError

pytestmark = pytest.mark.integration


def model_config(**overrides) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "tiny-mixtral", "tiny": {"arch": "mixtral", "seed": 0},
        "architecture": "MixtralForCausalLM", "max_model_len": 256,
        "engine_args": {"enforce_eager": True}, **overrides})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    eng = build_engine(model_config())
    await eng.start()
    yield eng
    eng.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_chat_stream_follows_the_protocol(engine):
    request = GenerationRequest("c1", messages=(ChatMessage("user", "Hello!"),),
                                sampling=SamplingOptions(max_tokens=10, temperature=0))
    ids = await engine.prompt_token_ids(request)
    chunks = [c async for c in engine.generate(request)]
    assert {c.prompt_tokens for c in chunks} == {len(ids)}
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(set(counts)) and counts[0] >= 1  # cumulative, strictly increasing
    assert [c.finish_reason is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].completion_tokens <= 10
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].completion_tokens


@pytest.mark.asyncio(loop_scope="module")
async def test_rejects_too_long_prompt_before_generating(engine):
    with pytest.raises(PromptTooLongError):
        async for _ in engine.generate(GenerationRequest("c2", prompt="hello world " * 300)):
            pass


@pytest.mark.asyncio(loop_scope="module")
async def test_closing_the_stream_aborts_and_frees_the_engine(engine):
    stream = engine.generate(GenerationRequest("c3", prompt="Tell me",
                                               sampling=SamplingOptions(max_tokens=200)))
    await anext(stream)
    await stream.aclose()
    assert engine.stats().running_requests == 0
    await engine.check_health()


@pytest.mark.asyncio(loop_scope="module")
async def test_wrong_architecture_fails_start_with_config_error():
    eng = build_engine(model_config(architecture="DeepseekV3ForCausalLM"))
    with pytest.raises(ConfigError, match="is MixtralForCausalLM"):
        await eng.start()


@pytest.mark.asyncio(loop_scope="module")
async def test_unknown_engine_arg_fails_start_with_config_error():
    eng = build_engine(model_config(engine_args={"no_such_arg": 1}))
    with pytest.raises(ConfigError, match="no_such_arg"):
        await eng.start()
