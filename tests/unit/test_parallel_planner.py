"""The layout planner against public figures, its layout rules, and what it emits."""

import pytest

from moestack.config.schema import Layout
from moestack.parallel import GPUS, SHAPES, PlanRequest, plan
from moestack.parallel.layout import candidate_layouts


def _plan(model, gpu, gpus, **kw):
    kw.setdefault("context_tokens", 32768)
    kw.setdefault("usd_per_gpu_hour", 3.0)
    return plan(PlanRequest(SHAPES[model], GPUS[gpu], gpus, **kw))


def _layout(tp: int = 1, pp: int = 1, dp: int = 1, ep: bool = False) -> Layout:
    return Layout(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                  expert_parallel=ep)


def test_deepseek_v3_fp8_does_not_fit_one_8xh100_node_and_says_why():
    p = _plan("deepseek-v3", "h100", 8)
    assert not p.fits
    assert p.weight_gib_per_gpu > 71.6
    assert any("GiB per GPU" in m and "usable" in m for m in p.problems)


def test_deepseek_v3_fp8_fits_two_8xh100_nodes():
    p = _plan("deepseek-v3", "h100", 16)
    assert p.fits and p.nodes == 2 and p.layout.world_size == 16
    assert p.kv_capacity_tokens >= 32768


def test_deepseek_v3_fp8_fits_one_8xh200_node():
    p = _plan("deepseek-v3", "h200", 8)
    assert p.fits and p.nodes == 1


def test_deepseek_v3_in_bf16_does_not_fit_one_8xh200_node():
    assert not _plan("deepseek-v3", "h200", 8, weight_dtype="bf16").fits


def test_mixtral_8x7b_bf16_fits_two_80gb_gpus_but_not_one():
    assert _plan("mixtral-8x7b", "h100", 2).fits
    assert _plan("mixtral-8x7b", "a100", 2).fits
    assert not _plan("mixtral-8x7b", "h100", 1).fits


def test_qwen3_30b_a3b_fits_one_80gb_gpu_but_not_one_l40s():
    assert _plan("qwen3-30b-a3b", "h100", 1).fits
    assert not _plan("qwen3-30b-a3b", "l40s", 1).fits


def test_tensor_parallel_must_divide_attention_heads():
    p = _plan("mixtral-8x22b", "h100", 8, layout=_layout(5))
    assert any("does not divide the 48 attention heads" in m for m in p.problems)


def test_expert_parallel_must_divide_experts():
    p = _plan("mixtral-8x7b", "h100", 16, layout=_layout(8, dp=2, ep=True))
    assert any("does not divide the 8 routed experts" in m for m in p.problems)


def test_tensor_parallel_group_never_straddles_nodes():
    p = _plan("deepseek-v3", "h100", 16, layout=_layout(16))
    assert not p.fits
    assert any("straddle nodes" in m for m in p.problems)
    # The same GPUs split as TP inside nodes and PP across them is fine.
    assert _plan("deepseek-v3", "h100", 16, layout=_layout(8, pp=2)).fits


def test_layout_needing_more_gpus_than_given_is_refused():
    p = _plan("qwen3-30b-a3b", "h100", 1, layout=_layout(2))
    assert any("needs 2 GPUs" in m for m in p.problems)


def test_fp8_experts_split_below_the_128_wide_blocks_need_expert_parallelism():
    # 2048-wide experts split 32 ways are 64 wide: not a whole FP8 block.
    p = _plan("deepseek-v3", "h100", 32, layout=_layout(8, dp=4))
    assert any("FP8 weight blocks" in m for m in p.problems)
    assert not any("FP8" in m for m in _plan("deepseek-v3", "h100", 32,
                                             layout=_layout(8, dp=4, ep=True)).problems)


def test_context_that_leaves_no_room_for_one_sequence_is_explained():
    p = _plan("qwen3-30b-a3b", "h100", 1, context_tokens=40960, gpu_memory_utilization=0.78)
    assert not p.fits and any("KV cache holds" in m for m in p.problems)


def test_mla_kv_capacity_grows_with_data_parallel_ranks_not_with_tensor_parallel():
    tp = _plan("deepseek-v3", "h200", 8, layout=_layout(8, ep=True))
    dp = _plan("deepseek-v3", "h200", 8, layout=_layout(dp=8, ep=True))
    assert tp.kv_bytes_per_token_per_gpu == dp.kv_bytes_per_token_per_gpu == 576 * 61 * 2
    assert dp.kv_capacity_tokens > 3 * tp.kv_capacity_tokens


def test_fp8_kv_cache_doubles_token_capacity_of_the_same_memory():
    a = _plan("mixtral-8x7b", "h100", 2, layout=_layout(2))
    b = _plan("mixtral-8x7b", "h100", 2, layout=_layout(2), kv_cache_dtype="fp8")
    assert b.kv_capacity_tokens == pytest.approx(2 * a.kv_capacity_tokens, rel=1e-4)


def test_decode_ceiling_is_below_the_hbm_roofline_of_active_weights():
    p = _plan("qwen3-30b-a3b", "h100", 1)
    # One stream reads at least every active weight once per token.
    bound = GPUS["h100"].hbm_bandwidth_gb_per_s * 1e9 / (SHAPES["qwen3-30b-a3b"].active_params()
                                                          * 2)
    assert 0.3 * bound < p.single_stream_tokens_per_s <= bound
    assert p.decode_ceiling_tokens_per_s > p.single_stream_tokens_per_s


def test_faster_memory_raises_the_decode_ceiling():
    h100 = _plan("deepseek-v3", "h200", 8, layout=_layout(8, ep=True))
    b200 = _plan("deepseek-v3", "b200", 8, layout=_layout(8, ep=True))
    assert b200.single_stream_tokens_per_s > 1.5 * h100.single_stream_tokens_per_s


def test_usd_per_million_tokens_follows_gpu_price_and_ceiling():
    p = _plan("mixtral-8x7b", "h100", 2, usd_per_gpu_hour=2.0)
    assert p.usd_per_hour == 4.0
    assert p.usd_per_1m_output_tokens == pytest.approx(
        4.0 / (p.decode_ceiling_tokens_per_s * 3600) * 1e6)
    assert _plan("mixtral-8x7b", "h100", 2, usd_per_gpu_hour=None).usd_per_1m_output_tokens is None


def test_chosen_layout_is_valid_and_uses_every_gpu():
    for model, gpu, n in [("deepseek-v3", "h100", 16), ("qwen3-235b-a22b", "h100", 8),
                          ("mixtral-8x22b", "a100", 8), ("kimi-k2", "h200", 16)]:
        p = _plan(model, gpu, n)
        assert p.fits, (model, p.problems)
        assert p.layout.world_size == n
        assert p.layout in candidate_layouts(n, GPUS[gpu].gpus_per_node)


def test_emits_vllm_engine_args_for_a_two_node_tp_ep_layout():
    p = _plan("deepseek-v3", "h100", 16, layout=_layout(8, dp=2, ep=True))
    args = p.engine_args()
    assert args["tensor_parallel_size"] == 8 and args["data_parallel_size"] == 2
    assert args["pipeline_parallel_size"] == 1
    assert args["enable_expert_parallel"] is True and args["enable_eplb"] is True
    assert args["distributed_executor_backend"] == "ray"
    assert args["max_model_len"] == 32768
    assert "quantization" not in args  # the checkpoint is FP8 already


def test_emits_placement_bundles_per_gpu_and_strategy_by_node_span():
    bundles, strategy = _plan("deepseek-v3", "h100", 16).placement()
    assert len(bundles) == 16 and all(b["GPU"] == 1 for b in bundles) and strategy == "PACK"
    bundles, strategy = _plan("mixtral-8x7b", "h100", 2).placement()
    assert len(bundles) == 2 and strategy == "STRICT_PACK"
    _, strategy = _plan("qwen3-30b-a3b", "h100", 1).placement()
    assert strategy == "PACK"
