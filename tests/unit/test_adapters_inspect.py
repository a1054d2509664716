"""Checking a LoRA adapter directory against its base model: every bad input gets one clear
InvalidAdapterError that names what is wrong."""

import json
import struct

import pytest

from moestack.adapters import AdapterSpec, build_adapter, inspect_adapter
from moestack.errors import InvalidAdapterError, InvalidRequestError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024}
MIXTRAL = {**LLAMA, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
           "num_local_experts": 8}
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
               "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
               "q_lora_rank": None, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
               "qk_nope_head_dim": 64, "v_head_dim": 64, "n_routed_experts": 8}


def write_base(tmp_path, config=LLAMA, name="base"):
    base = tmp_path / name
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.fixture
def adapter(tmp_path):
    return build_adapter(write_base(tmp_path), tmp_path / "adapter", AdapterSpec(seed=1))


def expect(path, message, config=LLAMA, max_lora_rank=8):
    with pytest.raises(InvalidAdapterError, match=message) as info:
        inspect_adapter(path, config, max_lora_rank)
    assert isinstance(info.value, InvalidRequestError) and info.value.status_code == 400
    assert info.value.to_openai()["error"]["code"] == "invalid_adapter"
    return info.value


def edit_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def write_tensors(adapter, shapes: dict[str, list[int]], dtype="F32"):
    """A safetensors file with zero-filled tensors of the given shapes (header written here,
    so that malformed files can be made too)."""
    header, data, offset = {}, b"", 0
    for name, shape in shapes.items():
        size = 4 * max(1, __import__("math").prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += b"\0" * size
        offset += size
    raw = json.dumps(header).encode()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def name(layer, module, part, group="self_attn"):
    return f"base_model.model.model.layers.{layer}.{group}.{module}.lora_{part}.weight"


def test_a_built_adapter_passes_with_rank_alpha_modules_base_name_and_hash(adapter):
    info = inspect_adapter(adapter, LLAMA, max_lora_rank=8)
    assert (info.rank, info.alpha, info.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert info.base_model_name == "base"
    assert info.size_bytes == sum(p.stat().st_size for p in adapter.iterdir())
    assert len(info.content_sha256) == 64
    assert inspect_adapter(str(adapter), LLAMA, 16) == info  # same files, same answer


def test_content_hash_changes_with_either_file_and_not_with_other_files(adapter):
    before = inspect_adapter(adapter, LLAMA, 8).content_sha256
    (adapter / "README.md").write_text("notes")
    assert inspect_adapter(adapter, LLAMA, 8).content_sha256 == before
    edit_config(adapter, lora_alpha=32)
    after_config = inspect_adapter(adapter, LLAMA, 8).content_sha256
    assert after_config != before
    weights = adapter / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert inspect_adapter(adapter, LLAMA, 8).content_sha256 != after_config


def test_rejects_a_missing_directory(tmp_path):
    expect(tmp_path / "nowhere", "does not exist")


def test_rejects_a_file_given_as_the_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    expect(tmp_path / "file", "is not a directory")


def test_rejects_a_directory_without_adapter_config(adapter):
    (adapter / "adapter_config.json").unlink()
    expect(adapter, "has no adapter_config.json")


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe".decode("latin-1"), "is not valid JSON"),
])
def test_rejects_malformed_adapter_config(adapter, text, message):
    (adapter / "adapter_config.json").write_text(text, encoding="latin-1")
    expect(adapter, message)


@pytest.mark.parametrize("changes,message", [
    ({"r": 0}, "`r` .* positive integer"),
    ({"r": "8"}, "`r` .* positive integer"),
    ({"r": None}, "`r` .* positive integer"),
    ({"lora_alpha": -1}, "`lora_alpha` must be a positive number"),
    ({"target_modules": []}, "`target_modules` must be a non-empty list"),
    ({"target_modules": [1]}, "`target_modules` must be a non-empty list"),
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
])
def test_rejects_config_fields_vllm_cannot_serve(adapter, changes, message):
    edit_config(adapter, **changes)
    expect(adapter, message)


def test_rejects_a_rank_over_the_models_max_lora_rank(adapter):
    err = expect(adapter, "LoRA rank 8 is over the model's max_lora_rank 4", max_lora_rank=4)
    assert err.param == "path"


def test_rank_pattern_counts_towards_max_lora_rank_as_in_vllm(adapter):
    edit_config(adapter, rank_pattern={"v_proj": 16})
    expect(adapter, "LoRA rank 16 is over the model's max_lora_rank 8")


def test_rejects_target_modules_the_base_has_not(adapter):
    edit_config(adapter, target_modules=["q_proj", "w1"])
    expect(adapter, r"target module\(s\) w1 are not adaptable modules of the base "
                    r"LlamaForCausalLM \(it has: q_proj, k_proj")


def test_rejects_mlp_targets_on_a_moe_base(tmp_path):
    adapter = build_adapter(write_base(tmp_path), tmp_path / "a",
                            AdapterSpec(targets=("q_proj", "gate_proj")))
    expect(adapter, r"gate_proj are not adaptable modules of the base MixtralForCausalLM",
           config=MIXTRAL)


def test_rejects_a_directory_without_weights(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    expect(adapter, "has no adapter_model.safetensors .*pickled .bin weights are not accepted")


def test_rejects_empty_weights(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    expect(adapter, "adapter_model.safetensors: the file is empty")


@pytest.mark.parametrize("content,message", [
    (b"abc", "too short for a safetensors header"),
    (struct.pack("<Q", 10**12) + b"{}", "header length does not fit"),
    (struct.pack("<Q", 4) + b"nope", "header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    (struct.pack("<Q", 2) + b"{}", "holds no tensors"),
])
def test_rejects_files_that_are_not_safetensors(adapter, content, message):
    (adapter / "adapter_model.safetensors").write_bytes(content)
    expect(adapter, message)


def test_rejects_truncated_weights(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    expect(adapter, "the file is truncated")


def test_rejects_tensors_for_another_hidden_size(tmp_path):
    other = {**LLAMA, "hidden_size": 64, "head_dim": 16}
    adapter = build_adapter(write_base(tmp_path, other), tmp_path / "a")
    expect(adapter, r"layer 0 self_attn.q_proj: lora_A is \[8, 64\] and lora_B is \[64, 8\], but "
                    r"the base LlamaForCausalLM needs lora_A \[8, 128\] and lora_B \[128, 8\]")


def test_rejects_tensors_for_more_layers_than_the_base_has(tmp_path):
    adapter = build_adapter(write_base(tmp_path, {**LLAMA, "num_hidden_layers": 4}),
                            tmp_path / "a")
    expect(adapter, "is for layer 2, but the base LlamaForCausalLM has 2 layers")


def test_rejects_a_rank_in_the_tensors_other_than_r(adapter):
    edit_config(adapter, r=4)
    expect(adapter, r"lora_A is \[8, 128\] .* needs lora_A \[4, 128\]")


def test_rejects_lora_a_without_lora_b(adapter):
    write_tensors(adapter, {name(0, "q_proj", "A"): [8, 128]})
    expect(adapter, "layer 0 self_attn.q_proj has lora_A but no lora_B")


def test_rejects_tensors_of_modules_the_base_has_not(adapter):
    write_tensors(adapter, {name(0, "w1", "A", "block_sparse_moe.experts.0"): [8, 128]})
    expect(adapter, "adapts block_sparse_moe.experts.0.w1, which is not an adaptable module")


def test_rejects_tensors_outside_decoder_layers(adapter):
    write_tensors(adapter, {"base_model.model.lm_head.lora_A.weight": [8, 128]})
    expect(adapter, "is not a LoRA weight of a decoder layer")


def test_rejects_tensors_of_modules_target_modules_does_not_list(adapter):
    write_tensors(adapter, {name(0, "k_proj", "A"): [8, 128], name(0, "k_proj", "B"): [64, 8]})
    expect(adapter, "adapts k_proj, which adapter_config.json's target_modules does not list")


def test_rejects_integer_tensors(adapter):
    write_tensors(adapter, {name(0, "q_proj", "A"): [8, 128], name(0, "q_proj", "B"): [128, 8]},
                  dtype="I32")
    expect(adapter, "has dtype I32")


def test_rejects_a_base_whose_layout_is_unknown(adapter):
    expect(adapter, "not supported on DeepseekV4ForCausalLM bases",
           config={"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"})
    expect(adapter, "has no valid `num_attention_heads`",
           config={k: v for k, v in LLAMA.items() if k != "num_attention_heads"})


def test_mla_base_checks_latent_attention_shapes(tmp_path):
    adapter = build_adapter(write_base(tmp_path, DEEPSEEK_V3), tmp_path / "a",
                            AdapterSpec(targets=("q_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                 "o_proj")))
    info = inspect_adapter(adapter, DEEPSEEK_V3, 8)
    assert info.target_modules == ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_proj")
    expect(adapter, "needs lora_A", config={**DEEPSEEK_V3, "kv_lora_rank": 256})
