"""DeepSeek-V4 in the planner: shapes against the published configs, checkpoint sizes, the KV
cache as vLLM lays it out, and the layouts on H100, H200 and B200."""

import json
from dataclasses import replace

import pytest

from moestack.config.schema import Layout
from moestack.parallel import GPUS, SHAPES, PlanRequest, deepseek_v4, plan, shape_from_hf_config

GIB = 1024**3


def _layout(tp: int = 1, pp: int = 1, dp: int = 1, ep: bool = False) -> Layout:
    return Layout(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                  expert_parallel=ep)

# The published DeepSeek-V4-Flash config.json (huggingface.co/deepseek-ai/DeepSeek-V4-Flash),
# the fields the planner reads; compress_ratios carries the MTP layer's 0 last.
FLASH_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "expert_dtype": "fp4", "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_size": 4096, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512,
    "max_position_embeddings": 1048576, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_attention_heads": 64, "num_experts_per_tok": 6,
    "num_hidden_layers": 43, "num_hash_layers": 3, "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "sliding_window": 128, "tie_word_embeddings": False,
    "topk_method": "noaux_tc", "vocab_size": 129280,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}
# DeepSeek-V4-Pro's config.json differs in these fields.
PRO_CONFIG = {
    **FLASH_CONFIG, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
    "q_lora_rank": 1536, "o_groups": 16, "index_topk": 1024, "n_routed_experts": 384,
    "moe_intermediate_size": 3072, "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}

# Public checkpoint figures: the Flash safetensors hold 148.66 GiB (159.6e9 bytes, the sum of
# the safetensors files as read by llm-cal from the Hugging Face repo); Hugging Face counts the
# Pro checkpoint as ~862B "params" (safetensors elements: fp4 experts two per int8 element).
FLASH_SAFETENSORS_BYTES = 148.66 * GIB
PRO_SAFETENSORS_ELEMENTS = 862e9


@pytest.mark.parametrize("name,config", [("deepseek-v4-flash", FLASH_CONFIG),
                                         ("deepseek-v4-pro", PRO_CONFIG)])
def test_catalog_v4_shapes_equal_the_published_config_json(tmp_path, name, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    read = shape_from_hf_config(tmp_path, name=name)
    cat = SHAPES[name]
    assert replace(read, source="", api_baseline=None) == replace(cat, source="",
                                                                  api_baseline=None)
    assert "huggingface.co/deepseek-ai/" in cat.source and "config.json" in cat.source


def test_flash_layers_are_two_window_only_then_alternating_ratio_4_and_128():
    ratios = SHAPES["deepseek-v4-flash"].hybrid.compress_ratios
    assert (len(ratios), ratios.count(0), ratios.count(4), ratios.count(128)) == (43, 2, 21, 20)
    pro = SHAPES["deepseek-v4-pro"].hybrid.compress_ratios
    assert (len(pro), pro.count(0), pro.count(4), pro.count(128)) == (61, 0, 30, 31)


def test_flash_checkpoint_bytes_match_the_published_safetensors():
    s = SHAPES["deepseek-v4-flash"]
    assert deepseek_v4.checkpoint_bytes(s) == pytest.approx(FLASH_SAFETENSORS_BYTES, rel=0.02)


def test_pro_checkpoint_elements_match_hugging_face_and_its_bytes_are_about_865_gb():
    s = SHAPES["deepseek-v4-pro"]
    assert deepseek_v4.safetensors_elements(s) == pytest.approx(PRO_SAFETENSORS_ELEMENTS,
                                                                rel=0.02)
    # fp8/int8 elements are one byte; bf16 embeddings and fp32 hyper-connections a few GB more.
    assert 0 < deepseek_v4.checkpoint_bytes(s) - deepseek_v4.safetensors_elements(s) < 10e9


def test_fp4_experts_take_about_half_the_bytes_of_fp8_experts():
    s = SHAPES["deepseek-v4-flash"]
    fp4 = s.weight_bytes("fp8")["routed"]
    assert fp4 == pytest.approx(s.routed_expert_params() * (0.5 + 1 / 32))
    assert s.weight_bytes("bf16")["routed"] == pytest.approx(2 * s.routed_expert_params())


def test_mtp_layer_is_in_the_checkpoint_but_not_in_the_loaded_weights():
    s = SHAPES["deepseek-v4-flash"]
    loaded = sum(s.weight_bytes("fp8").values())
    assert deepseek_v4.checkpoint_bytes(s) - loaded == pytest.approx(
        deepseek_v4.mtp_params(s) * 0.6, rel=0.3)


@pytest.mark.parametrize("name,ratio4,ratio128", [("deepseek-v4-flash", 21, 20),
                                                  ("deepseek-v4-pro", 30, 31)])
def test_kv_bytes_per_token_follow_vllm_pages(name, ratio4, ratio128):
    # vLLM: 256-token pages of 584-byte fp8_ds_mla entries padded to 576 B; ratio 4 keeps 64
    # entries per page (37440 B) plus 64 indexer keys of 132 B (8640 B), ratio 128 keeps 2
    # (1168 -> 1728 B). The sliding window does not grow with the context.
    expected = ratio4 * (37440 + 8640) / 256 + ratio128 * 1728 / 256
    s = SHAPES[name]
    p = plan(PlanRequest(s, GPUS["b200"], 8, context_tokens=131072))
    assert p.kv_bytes_per_token_per_gpu == round(expected)
    assert p.kv_cache_dtype == "fp8_ds_mla"


def test_kv_cache_at_1m_is_about_a_tenth_of_deepseek_v3_2s():
    # The model card: at 1M tokens V4-Pro needs ~10% of V3.2's KV cache. V3.2 in vLLM: 61
    # layers x (656 B fp8_ds_mla latent + 132 B indexer key) per token.
    s = SHAPES["deepseek-v4-pro"]
    v = s.hybrid
    v4_bytes = (deepseek_v4.kv_bytes_per_token(v, v.compress_ratios) * 2**20
                + deepseek_v4.kv_bytes_per_sequence(v, v.compress_ratios, s.head_dim))
    v32_bytes = 61 * (656 + 132) * 2**20
    assert 0.08 < v4_bytes / v32_bytes < 0.13


def test_every_sequence_holds_its_sliding_windows_and_compressor_state():
    v = SHAPES["deepseek-v4-flash"].hybrid
    fixed = deepseek_v4.kv_bytes_per_sequence(v, v.compress_ratios, 512)
    windows = 43 * 3 * 37440                  # (128 / 64 + 1) blocks of 64 entries per layer
    assert fixed > windows
    # small beside 8K tokens
    assert fixed < 128 * deepseek_v4.kv_bytes_per_token(v, v.compress_ratios) * 64


def test_flash_fits_one_8xh100_node_at_128k_and_1m():
    p = plan(PlanRequest(SHAPES["deepseek-v4-flash"], GPUS["h100"], 8, context_tokens=131072,
                         usd_per_gpu_hour=2.99))
    assert p.fits, p.problems
    at = {c.context_tokens: c for c in p.at_contexts}
    assert set(at) == {131072, 1048576}
    assert at[1048576].max_concurrent_sequences >= 8
    assert at[1048576].max_concurrent_sequences < at[131072].max_concurrent_sequences
    assert at[1048576].usd_per_1m_output_tokens > at[131072].usd_per_1m_output_tokens


def test_pro_does_not_fit_one_8xh100_node_and_says_why():
    p = plan(PlanRequest(SHAPES["deepseek-v4-pro"], GPUS["h100"], 8, context_tokens=131072))
    assert not p.fits
    assert any("GiB per GPU" in m and "more GPUs" in m for m in p.problems)


@pytest.mark.parametrize("gpu", ["h200", "b200"])
def test_pro_fits_one_8_gpu_h200_or_b200_node_at_128k(gpu):
    p = plan(PlanRequest(SHAPES["deepseek-v4-pro"], GPUS[gpu], 8, context_tokens=131072))
    assert p.fits, p.problems
    assert p.layout.world_size == 8 and p.nodes == 1
    assert p.max_concurrent_sequences >= 1


def test_v4_engine_args_carry_the_kv_layout_block_size_and_tokenizer():
    p = plan(PlanRequest(SHAPES["deepseek-v4-flash"], GPUS["h100"], 8,
                         layout=_layout(dp=8, ep=True), context_tokens=131072))
    args = p.engine_args()
    assert args["kv_cache_dtype"] == "fp8_ds_mla" and args["block_size"] == 256
    assert args["tokenizer_mode"] == "deepseek_v4" and args["max_model_len"] == 131072
    assert args["data_parallel_size"] == 8 and args["enable_expert_parallel"]
    assert "quantization" not in args   # vLLM reads the checkpoint's own fp8/fp4 config


def test_kv_cache_is_whole_on_every_tensor_parallel_rank():
    s = SHAPES["deepseek-v4-flash"]
    tp8 = plan(PlanRequest(s, GPUS["h200"], 8, layout=_layout(8, ep=True)))
    dp8 = plan(PlanRequest(s, GPUS["h200"], 8, layout=_layout(dp=8, ep=True)))
    assert tp8.kv_bytes_per_token_per_gpu == dp8.kv_bytes_per_token_per_gpu
    assert dp8.kv_capacity_tokens > 4 * tp8.kv_capacity_tokens


def test_pipeline_stage_with_more_ratio_4_layers_sizes_the_cache():
    v = SHAPES["deepseek-v4-flash"].hybrid
    # Stages of 22 + 21 layers: the first holds the two window-only layers, so the second
    # (11 ratio-4 layers against 10) has the larger cache.
    stage = deepseek_v4.stage_ratios(v, 2)
    assert stage == v.compress_ratios[22:]
    assert (deepseek_v4.kv_bytes_per_token(v, stage)
            > deepseek_v4.kv_bytes_per_token(v, v.compress_ratios[:22]))


def test_decode_reads_grow_with_context_but_far_slower_than_dense_mla():
    v = SHAPES["deepseek-v4-pro"].hybrid
    short = deepseek_v4.kv_read_bytes(v, v.compress_ratios, 8192)
    long = deepseek_v4.kv_read_bytes(v, v.compress_ratios, 1048576)
    assert long > short
    assert long < 61 * 656 * 1048576 / 20    # V3.2-style dense latent reads, 20x less


def test_shape_of_a_built_tiny_v4_counts_exactly_its_stored_parameters(tmp_path):
    from moestack.engine import tiny

    if "deepseek-v4" not in tiny.TINY_ARCHS:
        pytest.skip("this tree's tiny builder makes no DeepSeek-V4 checkpoint yet")
    from safetensors import safe_open

    out = tiny.build_tiny_model(tiny.TinySpec("deepseek-v4"), tmp_path / "v4")
    shape = shape_from_hf_config(out)
    assert shape.hybrid is not None and shape.hybrid.compress_ratios
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()
                     if not k.endswith("tid2eid"))       # hash tables are not parameters
    assert shape.total_params() == stored


def _numel(dims):
    n = 1
    for d in dims:
        n *= d
    return n


def test_tensor_parallel_must_divide_the_output_groups():
    s = SHAPES["deepseek-v4-flash"]                     # 8 output groups, 64 heads
    gpu = replace(GPUS["h200"], gpus_per_node=16)
    p = plan(PlanRequest(s, gpu, 16, layout=_layout(16, ep=True)))
    assert any("o_groups" in m for m in p.problems)
    assert not any("o_groups" in m for m in plan(PlanRequest(
        s, GPUS["h200"], 8, layout=_layout(8, ep=True))).problems)
