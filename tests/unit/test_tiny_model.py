import json

import pytest

from moestack.cli import main
from moestack.engine.tiny import TINY_ARCHS, TinySpec, build_tiny_model, ensure_tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, arch):
    a = build_tiny_model(TinySpec(arch, seed=3), tmp_path / "a")
    b = build_tiny_model(TinySpec(arch, seed=3), tmp_path / "b")
    c = build_tiny_model(TinySpec(arch, seed=4), tmp_path / "c")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_deepseek_v3_shape_has_mla_shared_expert_and_grouped_routing(tmp_path):
    cfg = json.loads((build_tiny_model(TinySpec("deepseek-v3"), tmp_path / "m")
                      / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["kv_lora_rank"] == 512 and cfg["qk_rope_head_dim"] == 64  # MLA
    assert cfg["n_shared_experts"] == 1 and cfg["n_routed_experts"] == 8
    assert cfg["topk_method"] == "noaux_tc" and cfg["n_group"] > 1 and cfg["topk_group"] >= 1


def test_mixtral_shape_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    out = build_tiny_model(TinySpec("mixtral"), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 8
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|bos|><|user|>hi<|end|><|assistant|>"
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_ensure_reuses_the_cached_checkpoint(tmp_path):
    first = ensure_tiny_model(TinySpec("mixtral"), tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(TinySpec("mixtral"), tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_builds_with_progress(tmp_path, capsys):
    assert main(["model", "build-tiny", "--arch", "mixtral", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "[1/3]" in out and "[3/3]" in out
    assert (tmp_path / "x" / "tokenizer.json").is_file()
