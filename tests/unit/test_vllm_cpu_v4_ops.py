"""moestack's torch versions of DeepSeek-V4's CPU kernels against vLLM's native ones.

Each test feeds the same random inputs, at the tiny V4's shapes (hidden 64, 4 query heads of
dim 512, hc_mult 4, 64 experts top-6, indexer 4 heads of dim 128, block size 256), to the
native ``torch.ops._C`` kernel and to the torch function, and compares what they return or
write. The native kernels live only in vLLM's ``_C`` library (AVX512 with BF16): on another
CPU, or with ``MOESTACK_VLLM_CPU_KERNELS=avx2`` (the test process then keeps vLLM's AVX2
choice), the comparisons skip and say why. Registration is tested in child processes, one per
kernel library, since a process can load only one of them.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moestack.vllm_cpu import libraries as cpu_kernels
from moestack.vllm_cpu import v4_cache as tc
from moestack.vllm_cpu import v4_indexer as ti
from moestack.vllm_cpu import v4_ops as tk
from moestack.vllm_cpu import v4_mix as tm

pytest.importorskip("vllm")

BLOCK = 256
HEADS = 4
HIDDEN = 64
HC = 4
EXPERTS = 64
TOPK = 6
MAX_POS = 4096


def _native_reason() -> str | None:
    """Why the native kernels cannot run in this process, or None after loading them."""
    library = cpu_kernels.kernel_library()
    if library != "_C":  # an AVX2 host, or the switch: this process must keep vLLM's choice
        why = (f"{cpu_kernels.SWITCH_ENV}=avx2" if "avx512_bf16" in cpu_kernels.cpu_flags()
               else "this CPU has no avx512_bf16")
        return (f"vLLM's native DeepSeek-V4 kernels are only in _C; this process runs {library} "
                f"({why})")
    if tk._has_op(tk._LIBRARY_MARKER) and not tk._has_op("convert_weight_packed"):
        return "this process already loaded a vLLM kernel library without them"
    importlib.import_module("vllm._C")
    return None


@pytest.fixture(scope="module")
def native():
    reason = _native_reason()
    if reason:
        pytest.skip(reason)
    return torch.ops._C


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cos_sin(rope_dim=64) -> torch.Tensor:
    angles = torch.rand(MAX_POS, rope_dim // 2) * 6.28
    return torch.cat((angles.cos(), angles.sin()), dim=-1).contiguous()


def _close(actual, expected, rtol=1.6e-2, atol=1e-2):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _mla_cache(num_blocks=4, pad=64) -> torch.Tensor:
    """A zeroed fp8_ds_mla cache view whose row stride exceeds a block's bytes, as in vLLM."""
    width = BLOCK * (tc.TOKEN_BYTES + tc.SCALE_BYTES)
    return torch.zeros(num_blocks, width + pad, dtype=torch.uint8)[:, :width]


def _decode_mla(cache_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NoPE values, RoPE values, scale bytes) of every row of an fp8_ds_mla cache."""
    data = cache_2d[:, :BLOCK * tc.TOKEN_BYTES].reshape(-1, BLOCK, tc.TOKEN_BYTES)
    scales = cache_2d[:, BLOCK * tc.TOKEN_BYTES:].reshape(-1, BLOCK, tc.SCALE_BYTES)
    factor = torch.exp2(scales[..., :tc.NUM_TILES].float() - 127).repeat_interleave(64, -1)
    nope = data[..., :tc.NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float() * factor
    rope = data[..., tc.NOPE_DIM:].contiguous().view(torch.bfloat16).float()
    return nope, rope, scales


def _assert_same_mla_cache(actual, expected):
    a_nope, a_rope, a_scales = _decode_mla(actual)
    e_nope, e_rope, e_scales = _decode_mla(expected)
    assert (a_scales != e_scales).float().mean() < 1e-3
    # byte-exact but for a rare bf16 rounding of an input: then one FP8 step (2^-3 relative)
    _close(a_nope, e_nope, rtol=0.13, atol=2e-3)
    assert (actual != expected).float().mean() < 1e-4
    _close(a_rope, e_rope)


# ------------------------------------------------------------------------------- packed GEMM

def test_bmm_over_the_torch_packing_matches_the_native_packed_bmm(native):
    groups, tokens, rank, k_dim = 2, 7, 64, 2 * 512
    weight = torch.randn(groups, rank, k_dim).to(torch.bfloat16)
    x = torch.randn(groups, tokens, k_dim).to(torch.bfloat16)
    out_native = torch.empty(groups, tokens, rank, dtype=torch.bfloat16)
    native.bmm_cpu(out_native, x, native.convert_weight_packed(weight), True, None)
    out_torch = torch.empty_like(out_native)
    tm.bmm_cpu(out_torch, x, tm.convert_weight_packed(weight), True, None)
    _close(out_torch, out_native, atol=0.1)
    assert tm.convert_weight_packed(weight).data_ptr() != weight.data_ptr()


# ------------------------------------------------------------------------------- SWA cache

@pytest.mark.parametrize("pad", [64, 3])  # a row stride in whole words, and one that is not
def test_qnorm_rope_kv_insert_matches_native_queries_and_cache_bytes(native, pad):
    tokens = 300
    q = torch.randn(tokens, HEADS, 512).to(torch.bfloat16)
    kv = (torch.randn(tokens, 512) * 3).to(torch.bfloat16)
    positions = torch.arange(tokens) + 17
    slots = torch.randperm(4 * BLOCK)[:tokens]
    slots[::9] = -1
    cos_sin = _cos_sin()
    cache_native, cache_torch = _mla_cache(pad=pad), _mla_cache(pad=pad)
    q_native = native.fused_qnorm_rope_kv_insert_cpu(q, kv, positions, cache_native, slots,
                                                     cos_sin, HEADS + 2, 1e-6, BLOCK)
    q_torch = tc.fused_qnorm_rope_kv_insert_cpu(q, kv, positions, cache_torch, slots, cos_sin,
                                                HEADS + 2, 1e-6, BLOCK)
    assert q_torch.shape == q_native.shape == (tokens, HEADS + 2, 512)
    _close(q_torch, q_native)
    assert not q_torch[:, HEADS:].any()
    _assert_same_mla_cache(cache_torch, cache_native)


def test_inverse_rope_matches_native(native):
    o = torch.randn(9, HEADS, 512).to(torch.bfloat16)
    positions = torch.randint(0, MAX_POS, (9,))
    cos_sin = _cos_sin()
    expected = native.inverse_gptj_rope_o_proj_cpu(o, positions, cos_sin, 64)
    actual = tc.inverse_gptj_rope_o_proj_cpu(o, positions, cos_sin, 64)
    assert actual.dtype == expected.dtype == torch.float32
    _close(actual, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- attention

@pytest.mark.parametrize(("pad", "spread"), [(64, 1), (3, 1), (64, 8)])
def test_sparse_attention_matches_native_over_window_and_compressed_keys(native, pad, spread):
    """``spread`` 1: the tokens share most keys (prefill); 8: each has its own (decode)."""
    tokens, window, compressed = 64, 128, 96
    swa, comp = _mla_cache(num_blocks=4 * spread, pad=pad), _mla_cache(num_blocks=2, pad=pad)
    cos_sin = _cos_sin()
    rows = torch.randn(4 * spread * BLOCK, 512).to(torch.bfloat16)
    native.fused_qnorm_rope_kv_insert_cpu(rows[:, None].clone(), rows,
                                          torch.arange(rows.shape[0]) % MAX_POS, swa,
                                          torch.arange(rows.shape[0]), cos_sin, 1, 1e-6, BLOCK)
    native.fused_qnorm_rope_kv_insert_cpu(rows[:512, None].clone(), rows[:512] * 2,
                                          torch.arange(512), comp, torch.arange(512), cos_sin,
                                          1, 1e-6, BLOCK)
    q = torch.randn(tokens, HEADS, 512).to(torch.bfloat16)
    window_slots = (torch.arange(tokens).unsqueeze(-1) * 4 * BLOCK * (spread - 1) // tokens
                    + torch.randint(0, 4 * BLOCK, (tokens, window)))
    window_slots[:, 100:] = -1
    window_slots[3] = -1  # a token with no window key
    compressed_slots = torch.randint(0, 2 * BLOCK, (tokens, compressed))
    compressed_slots[::2, 50:] = -1
    compressed_slots[3] = -1  # ... and no compressed key: zeros
    sink = torch.randn(HEADS)
    assert tc._Keys(swa, window_slots, BLOCK).shared == (spread == 1)
    out_native = torch.empty(tokens, HEADS, 512, dtype=torch.bfloat16)
    native.flash_mla_with_kvcache_cpu(out_native, q, swa, window_slots, BLOCK, comp,
                                      compressed_slots, BLOCK, sink, 512 ** -0.5)
    out_torch = torch.full_like(out_native, 7.0)
    tc.flash_mla_with_kvcache_cpu(out_torch, q, swa, window_slots, BLOCK, comp,
                                  compressed_slots, BLOCK, sink, 512 ** -0.5)
    _close(out_torch, out_native, atol=2e-2)
    assert not out_torch[3].any()
    swa_only = torch.empty_like(out_native)
    native.flash_mla_with_kvcache_cpu(swa_only, q, swa, window_slots, BLOCK, swa,
                                      window_slots[:, :0], 1, sink, 512 ** -0.5)
    tc.flash_mla_with_kvcache_cpu(out_torch, q, swa, window_slots, BLOCK, swa,
                                  window_slots[:, :0], 1, sink, 512 ** -0.5)
    _close(out_torch, swa_only, atol=2e-2)


# ------------------------------------------------------------------------------- compressor

def _state_cache(width: int, num_blocks=3) -> torch.Tensor:
    """A state cache whose block stride exceeds its rows, as when pooled with the KV pages."""
    row = 2 * width
    return torch.zeros(num_blocks, BLOCK * row + 128)[:, :BLOCK * row].view(num_blocks, BLOCK,
                                                                              row)


def _fill_states(native, width: int, ratio: int, tokens: int):
    fused = torch.randn(tokens, 4 * width)  # kv | score | unused: strided column views
    kv, score = fused[:, :width], fused[:, width:2 * width]
    ape = torch.randn(ratio, width)
    positions = torch.arange(tokens)
    slots = positions.clone()
    slots[5] = -1
    state_native, state_torch = _state_cache(width), _state_cache(width)
    native.save_partial_states_cpu(kv, score, ape, positions, state_native, slots)
    tc.save_partial_states_cpu(kv, score, ape, positions, state_torch, slots)
    return state_native, state_torch, positions


def _gather_slots(positions, window: int) -> torch.Tensor:
    local = positions.unsqueeze(-1) - window + 1 + torch.arange(window)
    return torch.where(local >= 0, local, -1)


def test_saving_partial_states_matches_native(native):
    state_native, state_torch, _ = _fill_states(native, 1024, 4, 300)
    assert torch.equal(state_torch, state_native)


@pytest.mark.parametrize(("ratio", "width"), [(4, 1024), (128, 512)])
def test_compressor_store_matches_native(native, ratio, width):
    tokens = 384
    state_native, state_torch, positions = _fill_states(native, width, ratio, tokens)
    window = ratio * (2 if width == 1024 else 1)
    gather = _gather_slots(positions, window)
    kv_slots = torch.div(positions, ratio, rounding_mode="floor")
    kv_slots[(positions + 1) % ratio != 0] = 3  # never written: not a group's last token
    kv_slots[ratio * 3 - 1] = -1
    weight, cos_sin = torch.rand(512) + 0.5, _cos_sin()
    cache_native, cache_torch = _mla_cache(num_blocks=2), _mla_cache(num_blocks=2)
    native.compress_norm_rope_store_cpu(state_native, gather, positions, kv_slots, weight, 1e-6,
                                        cos_sin, cache_native, BLOCK, ratio)
    tc.compress_norm_rope_store_cpu(state_torch, gather, positions, kv_slots, weight, 1e-6,
                                    cos_sin, cache_torch, BLOCK, ratio)
    assert cache_native.any()
    _assert_same_mla_cache(cache_torch, cache_native)


def _indexer_cache(num_blocks=2, pad=32) -> torch.Tensor:
    width = BLOCK * (128 + 4)
    return torch.zeros(num_blocks, width + pad, dtype=torch.uint8)[:, :width]


def _decode_indexer(cache_2d):
    data = cache_2d[:, :BLOCK * 128].reshape(-1, BLOCK, 128)
    scale = cache_2d[:, BLOCK * 128:].contiguous().view(torch.float32).reshape(-1, BLOCK, 1)
    return data.contiguous().view(torch.float8_e4m3fn).float() * scale, scale


@pytest.mark.parametrize("pad", [32, 3])
def test_indexer_compressor_store_matches_native(native, pad):
    tokens, ratio, width = 384, 4, 256
    state_native, state_torch, positions = _fill_states(native, width, ratio, tokens)
    gather = _gather_slots(positions, 2 * ratio)
    kv_slots = torch.div(positions, ratio, rounding_mode="floor")
    weight, cos_sin = torch.rand(128) + 0.5, _cos_sin()
    cache_native, cache_torch = _indexer_cache(pad=pad), _indexer_cache(pad=pad)
    native.compress_norm_rope_store_indexer_cpu(state_native, gather, positions, kv_slots,
                                                weight, 1e-6, cos_sin, cache_native, BLOCK, ratio)
    ti.compress_norm_rope_store_indexer_cpu(state_torch, gather, positions, kv_slots, weight,
                                            1e-6, cos_sin, cache_torch, BLOCK, ratio)
    values_torch, scale_torch = _decode_indexer(cache_torch)
    values_native, scale_native = _decode_indexer(cache_native)
    assert scale_native.any()
    assert (scale_torch != scale_native).float().mean() < 1e-3
    _close(values_torch, values_native, rtol=0.13, atol=2e-3)
    assert (cache_torch != cache_native).float().mean() < 1e-2


# ------------------------------------------------------------------------------- indexer

def test_indexer_query_quantization_matches_native(native):
    tokens = 50
    positions = torch.randint(0, MAX_POS, (tokens,))
    index_q = torch.randn(tokens, HEADS, 128).to(torch.bfloat16).float()
    weights, cos_sin = torch.randn(tokens, HEADS), _cos_sin()
    results = []
    for kernel in (native.fused_indexer_q_rope_quant_cpu, ti.fused_indexer_q_rope_quant_cpu):
        q_fp8 = torch.empty(tokens, HEADS, 128, dtype=torch.float8_e4m3fn)
        weights_out = torch.empty(tokens, HEADS)
        kernel(positions, index_q, cos_sin, q_fp8, weights, 128 ** -0.5, HEADS ** -0.5,
               weights_out)
        results.append((q_fp8.float(), weights_out))
    (q_native, w_native), (q_torch, w_torch) = results
    _close(w_torch, w_native, rtol=1e-6, atol=0)
    _close(q_torch, q_native, rtol=0.13, atol=2e-3)
    assert (q_torch != q_native).float().mean() < 1e-2


def _random_indexer_cache(num_blocks: int, pad: int) -> torch.Tensor:
    cache = _indexer_cache(num_blocks, pad)
    values = (torch.randn(num_blocks, BLOCK * 128) * 100).clamp(-448, 448)
    cache[:, :BLOCK * 128] = values.to(torch.float8_e4m3fn).view(torch.uint8)
    scales = torch.rand(num_blocks, BLOCK) * 0.01 + 1e-3
    cache[:, BLOCK * 128:] = scales.view(torch.uint8).reshape(num_blocks, -1)
    return cache


@pytest.mark.parametrize("pad", [32, 3])
def test_indexer_logits_match_native_over_paged_keys(native, pad):
    batch, num_blocks = 5, 8
    cache = _random_indexer_cache(num_blocks, pad)
    q_fp8 = (torch.randn(batch, HEADS, 128) * 50).to(torch.float8_e4m3fn)
    weights = torch.randn(batch, HEADS)
    seq_lens = torch.tensor([1, 300, 512, 700, 1023], dtype=torch.int32)
    page_table = torch.stack([torch.randperm(num_blocks)[:4] for _ in range(batch)]).int()
    expected = native.fp8_paged_mqa_logits_cpu(q_fp8, cache, weights, seq_lens, page_table,
                                               BLOCK, 1023)
    actual = ti.fp8_paged_mqa_logits_cpu(q_fp8, cache, weights, seq_lens, page_table, BLOCK,
                                         1023)
    valid = torch.arange(1023).unsqueeze(0) < seq_lens.unsqueeze(-1)
    _close(actual[valid], expected[valid], rtol=1e-4, atol=1e-3)
    assert torch.isneginf(actual[~valid]).all()


def test_top512_matches_native_as_sets_of_positions_and_slots(native):
    batch, width = 6, 900
    scores = torch.randn(batch, width)
    seq_lens = torch.tensor([0, 17, 512, 513, 800, 900], dtype=torch.int32)
    page_table = torch.stack([torch.randperm(16)[:4] for _ in range(batch)]).int()
    outputs = []
    for kernel in (native.topk_transform_512_cpu, ti.topk_transform_512_cpu):
        pages = torch.full((batch, 512), 99, dtype=torch.int32)
        raw = torch.full((batch, 512), 99, dtype=torch.int32)
        kernel(scores, seq_lens, page_table, pages, BLOCK, raw)
        outputs.append((pages.sort(dim=-1).values, raw.sort(dim=-1).values))
    (pages_native, raw_native), (pages_torch, raw_torch) = outputs
    assert torch.equal(raw_torch, raw_native)
    assert torch.equal(pages_torch, pages_native)


# ------------------------------------------------------------------------------- hyper-connections

def _hc_inputs(tokens=11):
    x = torch.randn(tokens, HC, HIDDEN).to(torch.bfloat16)
    mix = (2 + HC) * HC
    return x, torch.randn(mix, HC * HIDDEN) * 0.1, torch.rand(3) + 0.5, torch.randn(mix) * 0.1


def test_hc_pre_matches_native(native):
    x, fn, scale, base = _hc_inputs()
    expected = native.hc_pre_fused_cpu(x, fn, scale, base, HC, 20, 1e-6, 1e-6)
    actual = tm.hc_pre_fused_cpu(x, fn, scale, base, HC, 20, 1e-6, 1e-6)
    _close(actual[0], expected[0])
    for a, e in zip(actual[1:], expected[1:]):
        assert a.dtype == e.dtype == torch.float32 and a.shape == e.shape
        _close(a, e, rtol=1e-4, atol=1e-5)


def test_hc_post_matches_native(native):
    tokens = 11
    x = torch.randn(tokens, HIDDEN).to(torch.bfloat16)
    residual = torch.randn(tokens, HC, HIDDEN).to(torch.bfloat16)
    post, comb = torch.rand(tokens, HC) * 2, torch.rand(tokens, HC, HC)
    _close(tm.hc_post_fused_cpu(x, residual, post, comb),
           native.hc_post_fused_cpu(x, residual, post, comb))


def test_hc_head_matches_native(native):
    x, fn, scale, base = _hc_inputs()
    fn, scale, base = fn[:HC].contiguous(), scale[:1].contiguous(), base[:HC].contiguous()
    _close(tm.hc_head_fused_cpu(x, fn, scale, base, 1e-6, 1e-6),
           native.hc_head_fused_cpu(x, fn, scale, base, 1e-6, 1e-6))


# ------------------------------------------------------------------------------- routing

@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_routing_matches_native(native, scoring, dtype):
    tokens = 33
    gating = (torch.randn(tokens, EXPERTS) * 8).to(dtype)  # past both sqrtsoftplus asymptotes
    tid2eid = torch.stack([torch.randperm(EXPERTS)[:TOPK] for _ in range(tokens)]).int()
    w_native, ids_native = native.hash_topk_cpu(gating, tid2eid, TOPK, scoring, 0, EXPERTS, 1.5)
    w_torch, ids_torch = tm.hash_topk_cpu(gating, tid2eid, TOPK, scoring, 0, EXPERTS, 1.5)
    assert ids_torch.dtype == torch.int32 and torch.equal(ids_torch, ids_native)
    _close(w_torch, w_native, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
def test_biased_routing_matches_native(native, scoring):
    tokens = 33
    gating = torch.randn(tokens, EXPERTS) * 8
    bias = torch.randn(EXPERTS)
    w_native, ids_native = native.biased_topk_cpu(gating, gating, bias, TOPK, True, scoring, 0,
                                                  1.5, True)
    w_torch, ids_torch = tm.biased_topk_cpu(gating, gating, bias, TOPK, True, scoring, 0, 1.5,
                                            True)
    assert torch.equal(ids_torch, ids_native)
    _close(w_torch, w_native, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- registration

REGISTER = textwrap.dedent("""
    import importlib, sys, torch
    try:
        importlib.import_module(sys.argv[1])
    except ImportError as e:  # vLLM ignores this too: the library loads, its init is misnamed
        assert "module export function" in str(e), e
    from moestack.vllm_cpu import v4_ops as tk
    print("REGISTERED", ",".join(tk.register_missing()))
    print("AGAIN", ",".join(tk.register_missing()))
    if "hc_head_fused_cpu" in tk.registered():
        x = torch.randn(3, 4, 64).to(torch.bfloat16)
        y = torch.ops._C.hc_head_fused_cpu(x, torch.randn(4, 256), torch.ones(1),
                                           torch.zeros(4), 1e-6, 1e-6)
        print("CALLED", tuple(y.shape))
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
        args = [mode.from_tensor(t) for t in (x, torch.randn(24, 256), torch.ones(3),
                                              torch.zeros(24))]
        with mode:
            fake = torch.ops._C.hc_pre_fused_cpu(*args, 4, 20, 1e-6, 1e-6)
        print("FAKE", [tuple(t.shape) for t in fake])
    print("WEIGHT_PACKED_LINEAR", hasattr(torch.ops._C, "weight_packed_linear"))
""")


def _register_in(library: str) -> str:
    out = subprocess.run([sys.executable, "-c", REGISTER, f"vllm.{library}"],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != cpu_kernels.SWITCH_ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_registers_every_kernel_the_avx2_library_lacks_and_only_once():
    stdout = _register_in("_C_AVX2")
    assert f"REGISTERED {','.join(tk.TORCH_KERNELS)}\n" in stdout
    assert "AGAIN \n" in stdout
    assert "CALLED (3, 64)" in stdout
    assert "FAKE [(3, 64), (3, 4), (3, 4, 4)]" in stdout
    assert "WEIGHT_PACKED_LINEAR False" in stdout


def test_registers_nothing_over_the_native_library():
    if "avx512_bf16" not in cpu_kernels.cpu_flags():
        pytest.skip("this CPU has no avx512_bf16: vLLM's _C cannot load here")
    stdout = _register_in("_C")
    assert "REGISTERED \n" in stdout and "WEIGHT_PACKED_LINEAR True" in stdout


def test_keeps_the_packing_group_out_where_a_native_kernel_reads_packed_weights(monkeypatch):
    native_ops = {"weight_packed_linear", "flash_mla_with_kvcache_cpu"}
    monkeypatch.setattr(tk, "_has_op", lambda name: name in native_ops)
    chosen = tk._to_register()
    assert not set(tk.PACKING_GROUP) & set(chosen)
    assert "flash_mla_with_kvcache_cpu" not in chosen and "hc_pre_fused_cpu" in chosen
    native_ops = {"bmm_cpu"}  # half of the group native: the other half stays out too
    assert not set(tk.PACKING_GROUP) & set(tk._to_register())
    native_ops = set()
    assert set(tk._to_register()) == set(tk.TORCH_KERNELS)


def test_supplies_exactly_the_kernels_the_v4_model_needs():
    assert set(tk.TORCH_KERNELS) == set(cpu_kernels.DEEPSEEK_V4_KERNELS)
