"""The builder of random PEFT LoRA adapters: deterministic, PEFT's names and shapes, non-zero B."""

import json

import pytest

from moestack.adapters import AdapterSpec, build_adapter, inspect_adapter
from moestack.cli import main
from moestack.errors import InvalidAdapterError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024}


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "tiny-llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(LLAMA))
    return path


def tensors(adapter):
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_same_arguments_give_identical_files_and_another_seed_differs(base, tmp_path):
    a = build_adapter(base, tmp_path / "a", AdapterSpec(seed=3))
    b = build_adapter(base, tmp_path / "b", AdapterSpec(seed=3))
    c = build_adapter(base, tmp_path / "c", AdapterSpec(seed=4))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "adapter_model.safetensors").read_bytes() != (
        c / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["adapter_config.json",
                                                   "adapter_model.safetensors"]


def test_tensors_have_peft_names_and_shapes_from_the_base_config(base, tmp_path):
    out = build_adapter(base, tmp_path / "a", AdapterSpec(rank=4, targets=("q_proj", "v_proj",
                                                                           "down_proj")))
    found = {name: list(t.shape) for name, t in tensors(out).items()}
    prefix = "base_model.model.model.layers"
    expected = {}
    for layer in range(2):
        expected |= {
            f"{prefix}.{layer}.self_attn.q_proj.lora_A.weight": [4, 128],
            f"{prefix}.{layer}.self_attn.q_proj.lora_B.weight": [128, 4],
            f"{prefix}.{layer}.self_attn.v_proj.lora_A.weight": [4, 128],
            f"{prefix}.{layer}.self_attn.v_proj.lora_B.weight": [64, 4],  # 2 KV heads x 32
            f"{prefix}.{layer}.mlp.down_proj.lora_A.weight": [4, 256],
            f"{prefix}.{layer}.mlp.down_proj.lora_B.weight": [128, 4],
        }
    assert found == expected


def test_b_matrices_are_not_zero_so_the_adapter_changes_outputs(base, tmp_path):
    out = build_adapter(base, tmp_path / "a")
    for name, t in tensors(out).items():
        assert t.abs().sum() > 0, name


def test_config_is_what_peft_writes(base, tmp_path):
    out = build_adapter(base, tmp_path / "a", AdapterSpec(rank=8, alpha=16, seed=1))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16,
                                                                             ["q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == "tiny-llama" and config["bias"] == "none"


def test_refuses_targets_the_base_has_not(base, tmp_path):
    with pytest.raises(InvalidAdapterError, match="w1 are not adaptable modules"):
        build_adapter(base, tmp_path / "a", AdapterSpec(targets=("q_proj", "w1")))
    assert not (tmp_path / "a").exists()


def test_cli_builds_an_adapter_that_passes_inspection(base, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["model", "build-adapter", "--base", str(base), "--out", str(out), "--rank", "8",
                 "--alpha", "16", "--targets", "q_proj,v_proj", "--seed", "5"]) == 0
    info = inspect_adapter(out, LLAMA, 8)
    printed = capsys.readouterr().out
    assert info.content_sha256 in printed and "rank-8" in printed
    assert (out / "adapter_model.safetensors").read_bytes() == build_adapter(
        base, tmp_path / "api", AdapterSpec(seed=5)).joinpath(
        "adapter_model.safetensors").read_bytes()


def test_cli_says_what_is_wrong_with_bad_targets(base, tmp_path, capsys):
    assert main(["model", "build-adapter", "--base", str(base), "--out", str(tmp_path / "x"),
                 "--targets", "experts"]) == 2
    assert "experts are not adaptable modules" in capsys.readouterr().err
