"""The V4 CPU speed-ups (``moestack.vllm_cpu.v4_speed``) give the same output, bit for bit, as
vLLM's unpatched path, on the native kernel and on the torch one.

The key slots are built the way ``cpu_sparse.forward_mqa`` builds them (a causal window of
128 per decode token, the ratio-4 layer's 512 top-k columns as the short-context fill or a
scattered top-k, the ratio-128 layer's dense columns) and mapped through vLLM's own
``map_local_to_global_slots_cpu``, once as vLLM does and once through the patch; the slots
built directly at their width equal the trimmed mapping; a compressor step without a
compressed-cache slot only saves its states, which is exact because the native compression
kernels write nothing then."""

import pytest
import torch

from moestack.vllm_cpu import v4_cache as tc
from moestack.vllm_cpu import v4_speed

from tests.unit.test_vllm_cpu_v4_ops import BLOCK, HEADS, MAX_POS, _cos_sin, _mla_cache, native

pytest.importorskip("vllm")

__all__ = ["native"]  # the fixture, shared with the kernel tests

WINDOW, TOPK, RATIO128_WIDTH = 128, 512, 16
BLOCKS = 4


def _map_slots():
    from vllm.models.deepseek_v4.cpu.cpu_utils import map_local_to_global_slots_cpu

    return map_local_to_global_slots_cpu


def _window(positions: torch.Tensor) -> torch.Tensor:
    """``forward_mqa``'s causal sliding window: local token indices, -1 where none."""
    start = (positions - WINDOW + 1).clamp(min=0)
    local = start.unsqueeze(-1) + torch.arange(WINDOW)
    return torch.where(local <= positions.unsqueeze(-1), local, torch.full_like(local, -1))


def _dense(positions: torch.Tensor, ratio: int, width: int) -> torch.Tensor:
    """The ratio-128 layer's (and the short-context ratio-4 fill's) compressed columns."""
    count = torch.div(positions + 1, ratio, rounding_mode="floor").clamp(max=width)
    arange = torch.arange(width).unsqueeze(0)
    return torch.where(arange < count.unsqueeze(-1), arange.expand(len(positions), width),
                       torch.full((len(positions), width), -1))


def _scattered(positions: torch.Tensor) -> torch.Tensor:
    """A learned top-k of a long context: keys spread over the columns, -1 holes, and the
    last columns empty for every token."""
    local = torch.randint(0, BLOCKS * BLOCK // 4, (len(positions), TOPK))
    local[torch.rand(local.shape) < 0.3] = -1
    local[:, 300:] = -1
    return local


def _caches(writer):
    swa, comp = _mla_cache(num_blocks=BLOCKS), _mla_cache(num_blocks=BLOCKS)
    rows = torch.randn(BLOCKS * BLOCK, 512).to(torch.bfloat16)
    slots = torch.arange(rows.shape[0])
    writer(rows[:, None].clone(), rows, slots % MAX_POS, swa, slots, _cos_sin(), 1, 1e-6, BLOCK)
    writer(rows[:, None].clone(), rows * 2, slots % MAX_POS, comp, slots, _cos_sin(), 1, 1e-6,
           BLOCK)
    return swa, comp


CASES = {
    "short decode, window-only layer": (torch.tensor([3, 9, 40, 73]), None),
    "short decode, ratio-4 fill": (torch.tensor([3, 9, 40, 73]), lambda p: _dense(p, 4, TOPK)),
    "ratio-128 layer, no compressed key yet": (
        torch.tensor([5, 60, 90, 100]), lambda p: _dense(p, 128, RATIO128_WIDTH)),
    "long decode, full windows": (
        torch.tensor([200, 500, 700, 1000]), lambda p: _dense(p, 128, RATIO128_WIDTH)),
    "long decode, scattered top-k": (torch.tensor([300, 600, 900, 1020]), _scattered),
    "prefill chunk": (torch.arange(0, 260, 4), lambda p: _dense(p, 4, TOPK)),
}


def _attend(kernel, swa, comp, positions, compressed, map_slots):
    req_idx = torch.arange(len(positions)) % 4
    block_table = torch.randperm(4 * BLOCKS).view(4, BLOCKS) % BLOCKS
    window_slots = map_slots(_window(positions), req_idx, block_table, BLOCK)
    if compressed is None:
        comp_slots, comp_cache = window_slots.new_full((len(positions), 0), -1), swa
    else:
        comp_slots = map_slots(compressed(positions), req_idx, block_table, BLOCK)
        comp_cache = comp
    q = torch.randn(len(positions), HEADS, 512).to(torch.bfloat16)
    out = torch.full((len(positions), HEADS, 512), 7.0, dtype=torch.bfloat16)
    kernel(out, q, swa, window_slots, BLOCK, comp_cache, comp_slots, BLOCK, torch.randn(HEADS),
           512 ** -0.5)
    return out, window_slots.shape[1], comp_slots.shape[1]


def _assert_same_output_as_unpatched(kernel, writer):
    full_map = _map_slots()
    trimmed_map = v4_speed._trimming(full_map)
    swa, comp = _caches(writer)
    narrower = 0
    for name, (positions, compressed) in CASES.items():
        torch.manual_seed(1)
        expected, full_w, full_c = _attend(kernel, swa, comp, positions, compressed, full_map)
        torch.manual_seed(1)
        actual, trim_w, trim_c = _attend(kernel, swa, comp, positions, compressed, trimmed_map)
        assert torch.equal(actual, expected), name
        narrower += (trim_w, trim_c) != (full_w, full_c)
    assert narrower >= 4  # the trimming did happen


def test_native_attention_over_present_columns_equals_the_unpatched_path(native):
    _assert_same_output_as_unpatched(native.flash_mla_with_kvcache_cpu,
                                     native.fused_qnorm_rope_kv_insert_cpu)


def test_torch_attention_over_present_columns_equals_the_unpatched_path():
    _assert_same_output_as_unpatched(tc.flash_mla_with_kvcache_cpu,
                                     tc.fused_qnorm_rope_kv_insert_cpu)


def test_trimming_drops_only_trailing_columns_without_a_key():
    local = torch.tensor([[0, -1, 2, -1, -1], [-1, -1, -1, 3, -1]])
    assert torch.equal(v4_speed.trim_absent_columns(local), local[:, :4])
    kept = local[:, :4]
    assert v4_speed.trim_absent_columns(kept) is kept
    assert v4_speed.trim_absent_columns(torch.full((2, 6), -1)).shape == (2, 0)
    assert v4_speed.trim_absent_columns(torch.full((0, 6), -1)).shape == (0, 0)
    window = _window(torch.tensor([3, 9]))
    assert v4_speed.trim_absent_columns(window).shape == (2, 10)


def test_install_patches_attention_and_compressors_only_once(step_metadata_restored):
    from vllm.models.deepseek_v4.cpu import cpu_compressor, cpu_sparse, cpu_utils

    from vllm.v1.attention.backends.mla import compressor_utils

    from moestack.vllm_cpu import shim

    # what the shim puts there on the pinned CPU build (the fixture takes it off again)
    compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL = shim.compressed_slot_mapping
    attention = cpu_sparse.DeepseekV4CPUAttention
    compressor = cpu_compressor.DeepseekV4CPUCompressor
    originals = (cpu_sparse.map_local_to_global_slots_cpu, attention.forward_mqa,
                 compressor.forward)
    try:
        v4_speed.install()
        v4_speed.install()
        patched = cpu_sparse.map_local_to_global_slots_cpu
        assert v4_speed.installed()
        assert patched.__wrapped__ is cpu_utils.map_local_to_global_slots_cpu
        assert attention.forward_mqa is v4_speed.forward_mqa
        assert compressor.forward.__wrapped__ is originals[2]  # wrapped once, not twice
        # the compressor gathers fixed-width state windows: never trimmed
        unpatched = cpu_utils.map_local_to_global_slots_cpu
        assert cpu_compressor.map_local_to_global_slots_cpu is unpatched
        # the step-metadata patches, each once
        from vllm.models.deepseek_v4.cpu import cpu_mla
        from vllm.v1.worker import gpu_model_runner

        build = gpu_model_runner.GPUModelRunner._build_attention_metadata
        assert getattr(build.__wrapped__, v4_speed._MARK, False) is False
        assert compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL.__wrapped__ is (
            shim.compressed_slot_mapping)
        assert cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.supports_update_block_table
    finally:
        (cpu_sparse.map_local_to_global_slots_cpu, attention.forward_mqa,
         compressor.forward) = originals


@pytest.mark.parametrize("name", list(CASES))
def test_window_and_dense_slots_equal_the_trimmed_vllm_mapping(name):
    positions, compressed = CASES[name]
    trimmed_map = v4_speed._trimming(_map_slots())
    req_idx = torch.arange(len(positions)) % 4
    block_table = torch.randperm(4 * BLOCKS).view(4, BLOCKS).to(torch.int32)
    expected = trimmed_map(_window(positions), req_idx, block_table, BLOCK)
    actual = v4_speed.window_slots(positions, req_idx, block_table, BLOCK, WINDOW)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    for ratio, width in ((128, RATIO128_WIDTH), (4, TOPK)):
        expected = trimmed_map(_dense(positions, ratio, width), req_idx, block_table, BLOCK // 4)
        actual = v4_speed.dense_slots(positions, req_idx, block_table, BLOCK // 4, ratio, width)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), ratio


def test_slots_of_no_token_are_empty():
    none = torch.empty(0, dtype=torch.int64)
    table = torch.zeros(1, BLOCKS, dtype=torch.int32)
    assert v4_speed.window_slots(none, none, table, BLOCK, WINDOW).shape == (0, 0)
    assert v4_speed.dense_slots(none, none, table, BLOCK, 128, 16).shape == (0, 0)
    early = torch.tensor([0, 5, 100])  # no ratio-128 key yet
    slots = v4_speed.dense_slots(early, torch.zeros(3, dtype=torch.int64), table, BLOCK, 128, 16)
    assert slots.shape == (3, 0) and slots.dtype == torch.int64


def test_slots_are_built_once_per_step_and_again_in_the_next():
    calls = []

    def build(positions, width):
        calls.append(width)
        return positions * width

    positions = torch.arange(4)
    step = (object(), {})
    first = v4_speed._shared(step, build, positions, 2)
    assert v4_speed._shared(step, build, positions, 2) is first
    v4_speed._shared(step, build, positions, 3)  # another width: its own entry
    v4_speed._shared(step, build, positions.clone(), 2)  # another tensor: its own entry
    assert calls == [2, 3, 2]
    next_step = (object(), step[1])  # same metadata dict, new forward context: built again
    assert v4_speed._shared(next_step, build, positions, 2) is not first
    assert calls == [2, 3, 2, 2]


class _Cache:
    def __init__(self, prefix, kv_cache=None):
        self.prefix, self.kv_cache = prefix, kv_cache


class _Metadata:
    def __init__(self, slot_mapping):
        self.slot_mapping = slot_mapping


class _Compressor:
    """What ``compressor_forward`` reads of a ``DeepseekV4CPUCompressor``."""

    coff, head_dim, k_cache_prefix = 2, 8, "k"

    def __init__(self):
        self.state_cache = _Cache("state", torch.zeros(2, 4, 32))
        self.ape = torch.randn(4, 16)


def _compressor_step(monkeypatch, k_slots, calls):
    metadata = {"k": _Metadata(k_slots), "state": _Metadata(torch.tensor([0, 1, 2]))}
    context = type("Context", (), {"attn_metadata": metadata})()
    kernels = type("Kernels", (), {"save_partial_states_cpu": staticmethod(
        lambda *args: calls.append(("save", args[-1])))})
    monkeypatch.setitem(v4_speed._vllm, "get_forward_context", lambda: context)
    monkeypatch.setitem(v4_speed._vllm, "cpu_compressor", kernels)
    forward = v4_speed.compressor_forward(lambda *args: calls.append(("whole", args[2])))
    positions = torch.tensor([4, 5, 6])
    forward(_Compressor(), torch.randn(3, 32), positions, None)
    return positions


def test_compressor_without_a_compressed_slot_only_saves_its_states(monkeypatch):
    calls = []
    _compressor_step(monkeypatch, torch.full((3,), -1), calls)
    assert len(calls) == 1 and calls[0][0] == "save"
    assert torch.equal(calls[0][1], torch.tensor([0, 1, 2]))  # the state cache's own slots


def test_compressor_with_a_compressed_slot_runs_vllms_forward(monkeypatch):
    calls = []
    positions = _compressor_step(monkeypatch, torch.tensor([-1, -1, 7]), calls)
    assert calls == [("whole", positions)]


@pytest.mark.parametrize("indexer", [False, True])
def test_native_compression_writes_nothing_without_a_compressed_slot(native, indexer):
    """What makes skipping the call exact: with every compressed slot -1 (tokens that close
    a group included), the native kernels leave the cache untouched."""
    ratio, width = 4, (256 if indexer else 1024)
    head = width // 2
    state = torch.randn(3, BLOCK, 2 * width)
    positions = torch.arange(64)
    local = positions.unsqueeze(-1) - 2 * ratio + 1 + torch.arange(2 * ratio)
    gather = torch.where(local >= 0, local, -1)
    slots = torch.full((64,), -1)
    kernel = (native.compress_norm_rope_store_indexer_cpu if indexer
              else native.compress_norm_rope_store_cpu)
    cache = (torch.zeros(2, BLOCK * (128 + 4), dtype=torch.uint8) if indexer
             else _mla_cache(num_blocks=2))
    kernel(state, gather, positions, slots, torch.rand(head) + 0.5, 1e-6, _cos_sin(), cache,
           BLOCK, ratio)
    assert not cache.any()
    slots[ratio - 1] = 0  # the control: one slot, and the kernel writes
    kernel(state, gather, positions, slots, torch.rand(head) + 0.5, 1e-6, _cos_sin(), cache,
           BLOCK, ratio)
    assert cache.any()


@pytest.fixture
def step_metadata_restored():
    """Whatever ``install`` puts on vLLM's runner, block table, SWA builder, compressed slot
    kernel and scheduler coordinator is taken off again after the test."""
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import compressor_utils
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinatorNoPrefixCache
    from vllm.v1.worker import block_table, gpu_model_runner

    places = [(gpu_model_runner.GPUModelRunner, "_build_attention_metadata"),
              (compressor_utils, "_COMPRESSED_SLOT_MAPPING_KERNEL"),
              (block_table.BlockTable, "compute_slot_mapping"),
              (cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder, "update_block_table"),
              (cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder, "supports_update_block_table")]
    places += [(KVCacheCoordinatorNoPrefixCache, m) for m in (
        "remove_skipped_blocks", "get_num_blocks_to_allocate", "allocate_new_blocks")]
    saved = [(owner, name, owner.__dict__.get(name, _ABSENT)) for owner, name in places]
    yield
    for owner, name, value in saved:
        if value is _ABSENT:
            if name in owner.__dict__:
                delattr(owner, name)
        else:
            setattr(owner, name, value)


_ABSENT = object()


def _block_table(block_size: int, rows: int = 4, width: int = 8):
    from vllm.v1.worker.block_table import BlockTable

    table = BlockTable(block_size, rows, width, 64, False, torch.device("cpu"), 1)
    table.block_table.gpu[:] = torch.randperm(rows * width).view(rows, width).to(torch.int32)
    return table


@pytest.mark.parametrize("block_size", [4, 64, 256])
def test_slot_mapping_called_directly_equals_vllms_launch(native, block_size):
    from vllm.v1.worker.block_table import BlockTable

    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.register_triton_kernel_overrides()  # what a CPU engine does at start
    if not v4_speed._slot_kernel_is_cpu_override():
        pytest.skip("vLLM routes the slot mapping to Triton here (Triton with a CPU backend)")
    query_start_loc = torch.tensor([0, 1, 4, 5, 9], dtype=torch.int32)
    positions = torch.tensor([7, 0, 1, 2, 30, 20, 21, 22, 23]) * (block_size // 4)
    table = _block_table(block_size)
    table.slot_mapping.gpu.fill_(12345)
    BlockTable.compute_slot_mapping(table, 4, query_start_loc, positions)
    expected = table.slot_mapping.gpu.clone()
    table.slot_mapping.gpu.fill_(12345)
    v4_speed.compute_slot_mapping(BlockTable.compute_slot_mapping)(
        table, 4, query_start_loc, positions)
    assert torch.equal(table.slot_mapping.gpu, expected)
    first = int(positions[0])  # the first request's token, by hand
    assert expected[0] == (table.block_table.gpu[0, first // block_size] * block_size
                           + first % block_size)


def _compressed_args(ratio: int, out=None):
    slot_mapping = torch.arange(12, dtype=torch.int64) + 100
    slot_mapping[5] = -1
    query_start_loc = torch.tensor([0, 1, 2, 10, 12], dtype=torch.int32)
    seq_lens = torch.tensor([4, 128, 16, 256], dtype=torch.int32)
    block_table = torch.randperm(32).view(4, 8).to(torch.int32)
    out = torch.full((16,), -1, dtype=torch.int64)[:12] if out is None else out
    return [out, slot_mapping, query_start_loc, seq_lens, block_table, 2, ratio, 1, 1]


def test_compressed_slots_once_copies_a_repeated_mapping_within_a_build(monkeypatch):
    from moestack.vllm_cpu import shim

    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[6])
        shim.compressed_slot_mapping(*args, **kwargs)

    once = v4_speed.compressed_slots_once(kernel)
    args4, expected = _compressed_args(4), {}
    for ratio in (4, 128):
        reference = _compressed_args(ratio)
        reference[1:] = args4[1:6] + [ratio] + args4[7:]
        shim.compressed_slot_mapping(*reference)
        expected[ratio] = reference[0].clone()
    assert (expected[4] >= 0).any() and (expected[128] >= 0).any()
    monkeypatch.setattr(v4_speed, "_build_memo", {})
    outs = []
    for ratio in (4, 4, 128, 4):
        args = list(args4)
        args[0], args[6] = torch.full((12,), -1, dtype=torch.int64), ratio
        once(*args)
        outs.append((ratio, args[0]))
    assert calls == [4, 128]  # the repeated ratio-4 mappings are copies
    for ratio, out in outs:
        assert torch.equal(out, expected[ratio])
    monkeypatch.setattr(v4_speed, "_build_memo", None)  # outside a build: every call
    once(*_compressed_args(4))
    assert calls == [4, 128, 4]


def test_the_build_memo_lives_for_one_build_only():
    seen = []

    def build(self):
        seen.append(v4_speed._build_memo)
        v4_speed._build_memo["x"] = 1

    wrapped = v4_speed.build_attention_metadata(build)
    wrapped(None)
    wrapped(None)
    assert seen[0] is not seen[1] and seen[1] == {"x": 1}
    assert v4_speed._build_memo is None


def test_swa_groups_share_metadata_but_keep_their_own_block_table_and_slots():
    from types import SimpleNamespace

    from vllm.v1.attention.backends.mla.sparse_swa import DeepseekSparseSWAMetadata

    first = DeepseekSparseSWAMetadata(
        block_table=torch.zeros(2, 3, dtype=torch.int32), slot_mapping=torch.tensor([1, 2]),
        block_size=64, seq_lens=torch.tensor([5, 9]), query_start_loc=torch.tensor([0, 1, 2]),
        token_to_req_indices=torch.tensor([0, 1]), is_valid_token=torch.tensor([True, True]))
    builder = SimpleNamespace(is_valid_token=torch.ones(8, dtype=torch.bool))
    table, slots = torch.ones(2, 3, dtype=torch.int32), torch.tensor([70, -1])
    second = v4_speed.swa_update_block_table(builder, first, table, slots)
    assert second.block_table is table and second.slot_mapping is slots
    assert second.is_valid_token.tolist() == [True, False]
    assert second.is_valid_token.data_ptr() == builder.is_valid_token.data_ptr()
    assert first.is_valid_token.tolist() == [True, True]  # the first group's is untouched
    assert second.token_to_req_indices is first.token_to_req_indices
    assert second.seq_lens is first.seq_lens and second.block_size == 64
