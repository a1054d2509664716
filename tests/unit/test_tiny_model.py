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


def test_deepseek_v4_covers_every_layer_kind(tmp_path):
    from safetensors import safe_open

    out = build_tiny_model(TinySpec("deepseek-v4"), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV4ForCausalLM"] and cfg["model_type"] == "deepseek_v4"
    ratios, hash_layers = cfg["compress_ratios"], cfg["num_hash_layers"]
    assert {0, 4, 128} <= set(ratios) and len(ratios) == cfg["num_hidden_layers"]
    assert 0 < hash_layers < cfg["num_hidden_layers"]  # hash-routed and scored layers
    assert cfg["n_shared_experts"] == 1 and cfg["hc_mult"] > 1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for i, ratio in enumerate(ratios):
            p = f"layers.{i}"
            assert (f"{p}.ffn.gate.tid2eid" in names) == (i < hash_layers)
            assert (f"{p}.ffn.gate.bias" in names) == (i >= hash_layers)
            assert (f"{p}.attn.compressor.ape" in names) == (ratio > 1)
            assert (f"{p}.attn.indexer.wq_b.weight" in names) == (ratio == 4)
            assert f"{p}.ffn.shared_experts.w2.weight" in names
            assert str(f.get_slice(f"{p}.hc_attn_fn").get_dtype()) == "F32"
        assert {"embed.weight", "head.weight", "hc_head_fn"} <= names


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_chat_template_renders_tools_calls_and_results_in_hermes_format(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_tiny_model(TinySpec("mixtral"), tmp_path / "m")))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": '{"temp_c": 18}'},
        {"role": "tool", "tool_call_id": "b", "content": '{"temp_c": 25}'},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|bos|><|system|>Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the tool schema, as JSON
    assert text.count("<|system|>") == 1  # the system prompt is folded into the tools turn
    assert ('<|assistant|><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
            "</tool_call><|end|>") in text
    assert text.endswith('<|user|><tool_response>{"temp_c": 18}</tool_response><tool_response>'
                         '{"temp_c": 25}</tool_response><|end|><|assistant|>')


def test_tool_and_reasoning_markers_are_single_tokens_kept_in_decoded_text(tmp_path):
    from transformers import AutoTokenizer

    from moestack.engine.tiny import TEXT_TOKENS, VOCAB_SIZE

    out = build_tiny_model(TinySpec("mixtral"), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) <= VOCAB_SIZE  # every id has an embedding row
    for marker in TEXT_TOKENS:
        ids = tok.encode(f"a{marker}b", add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids).count(marker) == 1
        assert marker in tok.decode(ids, skip_special_tokens=True)


def test_llama_is_dense_and_takes_an_adapter_built_for_it(tmp_path):
    from moestack.adapters import AdapterSpec, build_adapter, inspect_adapter

    out = build_tiny_model(TinySpec("llama"), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (2, 128)
    assert not {"num_local_experts", "num_experts", "n_routed_experts"} & set(cfg)
    adapter = build_adapter(out, tmp_path / "a", AdapterSpec(targets=("q_proj", "down_proj")))
    assert inspect_adapter(adapter, cfg, 8).target_modules == ("down_proj", "q_proj")
