"""LoRA adapters on the in-package fake engine: the same methods as the vLLM engine, an LRU of
``max_cpu_loras`` (else ``max_loras``) adapters, and a deterministic answer per adapter."""

import json

import pytest

from moestack.config.schema import ModelConfig
from moestack.engine import build_engine
from moestack.errors import InvalidAdapterError
from moestack.testing import fake_model
from moestack.testing.requests import answer_text, engine_request


async def started(**engine_args):
    engine = build_engine(ModelConfig.model_validate(fake_model(engine_args=engine_args)))
    await engine.start()
    return engine


async def text(engine, model):
    """Choice 0's text and the answer's ``model`` for a 3-token completion naming ``model``."""
    req = engine_request({"model": model or "fake-moe", "prompt": "a b", "max_tokens": 3})
    chunks = [c async for c in engine.serve(req)]
    return answer_text(chunks), json.loads(b"".join(c.data for c in chunks))["model"]


async def test_an_engine_without_lora_refuses_adapters():
    engine = await started()
    with pytest.raises(InvalidAdapterError, match="serves no LoRA adapters"):
        await engine.ensure_adapter("a", "/adapters/a")
    assert engine.stats().adapters == frozenset()


async def test_adapter_answers_differ_from_the_base_and_from_each_other():
    engine = await started(enable_lora=True, max_loras=2)
    assert await engine.ensure_adapter("a", "/adapters/a") is True
    assert await engine.ensure_adapter("b", "/adapters/b") is True
    base, a, b = (await text(engine, None), await text(engine, "a"), await text(engine, "b"))
    assert base == ("tok1 tok2 tok3 ", "fake-moe")
    assert a == ("a.tok1 a.tok2 a.tok3 ", "a") and b[0] != a[0] and b[1] == "b"
    assert await text(engine, "a") == a  # deterministic


async def test_holds_at_most_max_loras_and_evicts_the_least_recently_used():
    engine = await started(enable_lora=True, max_loras=2)
    for name in ("a", "b"):
        await engine.ensure_adapter(name, f"/adapters/{name}")
    await text(engine, "a")  # a is now the most recently used
    assert await engine.ensure_adapter("c", "/adapters/c") is True
    assert engine.stats().adapters == frozenset({"a", "c"})
    assert await engine.ensure_adapter("a", "/adapters/a") is False  # held: no load
    assert engine.adapter_loads == 3
    assert (await text(engine, "b"))[1] == "b"  # registered but evicted: loads again
    assert engine.adapter_loads == 4 and engine.stats().adapters == frozenset({"a", "b"})


async def test_max_cpu_loras_sets_the_capacity_when_given():
    engine = await started(enable_lora=True, max_loras=1, max_cpu_loras=3)
    for name in ("a", "b", "c"):
        await engine.ensure_adapter(name, f"/adapters/{name}")
    assert engine.stats().adapters == frozenset({"a", "b", "c"})


async def test_a_new_path_reloads_and_removal_forgets():
    engine = await started(enable_lora=True, max_loras=2)
    await engine.ensure_adapter("a", "/adapters/a-v1")
    assert await engine.ensure_adapter("a", "/adapters/a-v2") is True
    assert engine.adapter_loads == 2
    assert await engine.remove_adapter("a") is True
    assert await engine.remove_adapter("a") is False
    assert engine.stats().adapters == frozenset()
    assert (await text(engine, "a"))[0] == "tok1 tok2 tok3 "  # no longer an adapter


async def test_an_adapter_may_not_take_the_base_models_name():
    engine = await started(enable_lora=True)
    with pytest.raises(InvalidAdapterError, match="conflicts with the base model"):
        await engine.ensure_adapter("fake-moe", "/adapters/x")
