"""The tiny DeepSeek-V4 on vLLM's AVX2 kernels, through moestack's torch kernels, against native.

``MOESTACK_VLLM_CPU_KERNELS=avx2`` (with ``ATEN_CPU_CAPABILITY=avx2``) makes vLLM load
``_C_AVX2``, what an AVX2-only host runs; the CPU shim then registers torch versions of the 16
kernels V4 needs that it lacks. The runs are those of ``benchmarks/tiny_v4_avx2.py --smoke
--report``, the benchmark's smoke run (one offline run per path, a child process each: a process
can load one kernel library only): after its timed generation, each generates greedily and scores
two fixed token sequences with ``prompt_logprobs``; one of them is longer than 4 x ``index_topk``
compressed positions, so the sparse indexer's kernels run too (each of the 16 kernels must be
called).

Why not equal tokens: the AVX2 path differs from the native one by bf16 rounding (its other
kernels, RMSNorm, GEMMs and MoE, are builds for another ISA, and the torch kernels round
where the native ones do only up to summation order), and the random-weight tiny V4 amplifies
rounding: one bf16 step added to one attention output per layer already moves its
teacher-forced log-probabilities by 0.008 nats on average (0.59 at most) and flips argmaxes.
So the comparison is teacher-forced, which keeps a difference from compounding: on the same
token sequences, the log-probabilities of the AVX2 path stay within a small mean distance of the
native ones and their argmax agrees wherever the native one is clear; a wrong kernel (a sign
error in one RoPE) moves them by 0.6 nats on average and agrees on 16 % of the argmaxes. Greedy
generation must agree on its first token (from the prefill) wherever the native choice is
clear; how many tokens agree before the first difference is printed.
"""

import pytest

from moestack.vllm_cpu import libraries as cpu_kernels
from moestack.vllm_cpu.v4_ops import TORCH_KERNELS

pytestmark = pytest.mark.integration

CLEAR_NATS = 0.25
"""A native top-2 log-probability margin above which the AVX2 path must pick the same token."""


@pytest.fixture(scope="module")
def avx2(tiny_v4_avx2_smoke):
    return tiny_v4_avx2_smoke[1]["avx2"]


@pytest.fixture(scope="module")
def native(tiny_v4_avx2_smoke):
    if "avx512_bf16" not in cpu_kernels.cpu_flags():
        pytest.skip("this CPU has no avx512_bf16: vLLM's native DeepSeek-V4 kernels (_C) "
                    "cannot run here to compare with")
    return tiny_v4_avx2_smoke[1]["native"]


def test_v4_runs_on_the_avx2_library_through_the_torch_kernels(avx2):
    assert not avx2["weight_packed_linear"]  # an AVX512-BF16-only op V4 does not use: _C_AVX2
    assert avx2["convert_weight_packed"] and avx2["registered"] == list(TORCH_KERNELS)
    never_called = [k for k in TORCH_KERNELS if not avx2["calls"].get(k)]
    assert never_called == []
    assert all(len(tokens) == 12 for tokens in avx2["greedy"])


def test_avx2_path_scores_and_generates_like_the_native_kernels(avx2, native):
    assert native["registered"] == [] and native["weight_packed_linear"]
    assert not [k for k in TORCH_KERNELS if not native["calls"].get(k)]
    for tokens, native_tokens, margins in zip(avx2["greedy"], native["greedy"],
                                              native["margins"]):
        if margins[0] > CLEAR_NATS:  # the first token comes from the prefill
            assert tokens[0] == native_tokens[0]
    pairs = list(zip(native["scored"], avx2["scored"]))
    mean_gap = sum(abs(n[0] - a[0]) for n, a in pairs) / len(pairs)
    agree = sum(n[1] == a[1] for n, a in pairs) / len(pairs)
    clear = [(n, a) for n, a in pairs if n[2] - n[3] > CLEAR_NATS]
    clear_agree = sum(n[1] == a[1] for n, a in clear) / len(clear)
    same_prefix = [next((i for i, (x, y) in enumerate(zip(n, a)) if x != y), len(n))
                   for n, a in zip(native["greedy"], avx2["greedy"])]
    print(f"teacher-forced over {len(pairs)} positions: mean |d logprob| {mean_gap:.4f} nats, "
          f"argmax agreement {agree:.3f} ({clear_agree:.3f} where the native margin > "
          f"{CLEAR_NATS}); "
          f"greedy tokens equal before the first difference: {same_prefix} of 12")
    assert mean_gap < 0.1
    assert agree > 0.85 and clear_agree > 0.95
