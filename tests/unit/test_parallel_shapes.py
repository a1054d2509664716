"""Model shapes: catalog totals match the publishers' figures; shapes read from config.json."""

import json

import pytest

from moestack.engine.tiny import TinySpec, build_tiny_model
from moestack.errors import ConfigError
from moestack.parallel import SHAPES, get_shape, shape_from_hf_config

# (total, active) parameters in billions as stated on each model card.
PUBLISHED = {
    "deepseek-v3": (671, 37), "kimi-k2": (1040, 32.6), "mixtral-8x7b": (46.7, 12.9),
    "mixtral-8x22b": (141, 39), "qwen3-30b-a3b": (30.5, 3.3), "qwen3-235b-a22b": (235, 22),
    "deepseek-v4-flash": (284, 13), "deepseek-v4-pro": (1600, 49),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_parameter_counts_match_published_totals(name):
    total, active = PUBLISHED[name]
    shape = SHAPES[name]
    assert shape.total_params() / 1e9 == pytest.approx(total, rel=0.02)
    assert shape.active_params() / 1e9 == pytest.approx(active, rel=0.03)


def test_deepseek_v3_fp8_weights_are_about_700_gb():
    s = SHAPES["deepseek-v3"]
    fp8_bytes = (s.total_params() - s.embedding_params()) + 2 * s.embedding_params()
    assert s.checkpoint_dtype == "fp8" and 650e9 < fp8_bytes < 700e9


def test_mla_kv_cache_is_one_latent_per_token_and_not_split_by_tensor_parallelism():
    s = SHAPES["deepseek-v3"]
    assert s.is_mla
    assert s.kv_elements_per_token_per_layer(1) == 512 + 64
    assert s.kv_elements_per_token_per_layer(8) == 512 + 64


def test_gqa_kv_cache_splits_heads_and_replicates_when_tp_exceeds_them():
    s = SHAPES["mixtral-8x7b"]  # 8 KV heads of 128
    assert s.kv_elements_per_token_per_layer(1) == 2 * 8 * 128
    assert s.kv_elements_per_token_per_layer(2) == 2 * 4 * 128
    assert s.kv_elements_per_token_per_layer(16) == 2 * 1 * 128


@pytest.mark.parametrize("arch", ["deepseek-v3", "mixtral"])
def test_reads_shape_of_a_built_tiny_checkpoint(tmp_path, arch):
    out = build_tiny_model(TinySpec(arch), tmp_path / arch)
    shape = shape_from_hf_config(out)
    cfg = json.loads((out / "config.json").read_text())
    assert shape.num_layers == cfg["num_hidden_layers"]
    assert shape.num_experts == 8 and shape.experts_per_token == 2
    # Parameters computed from the shape equal those in the safetensors file.
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert shape.total_params() == stored
    if arch == "deepseek-v3":
        assert shape.is_mla and shape.num_dense_layers == 1 and shape.num_shared_experts == 1
    else:
        assert not shape.is_mla and shape.num_kv_heads == 2
    assert get_shape(out) == shape


def _prod(dims):
    n = 1
    for d in dims:
        n *= d
    return n


def test_unknown_shape_names_the_catalog():
    with pytest.raises(ConfigError, match="deepseek-v3"):
        get_shape("gpt-5")


def test_dense_config_is_refused_with_the_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128}))
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts config"):
        shape_from_hf_config(tmp_path)
