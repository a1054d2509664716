"""The scheduler's one-pass KV-cache bookkeeping (``moestack.vllm_cpu.v4_sched``) leaves the
coordinator in the same state and gives the same answers as vLLM's per-group methods.

Two coordinators without prefix caching over the same groups (sliding windows that free blocks
as they move, and full attention) run the same request schedule the way
``KVCacheManager.allocate_slots`` drives them: one with vLLM's methods, one with the patched
ones; every answer, every request's block ids and the free-block count match at every step."""

import pytest
import torch

pytest.importorskip("vllm")

from moestack.vllm_cpu import v4_sched  # noqa: E402

METHODS = ("remove_skipped_blocks", "get_num_blocks_to_allocate", "allocate_new_blocks")


@pytest.fixture
def unpatched():
    """vLLM's own coordinator methods for the test, whatever was installed before."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinatorNoPrefixCache as cls

    before = {m: cls.__dict__.get(m) for m in METHODS}
    for m in METHODS:
        if m in cls.__dict__:
            delattr(cls, m)
    yield cls
    for m, fn in before.items():
        if fn is None:
            cls.__dict__.get(m) and delattr(cls, m)
        else:
            setattr(cls, m, fn)


def _coordinator(window_only: bool = False):
    from vllm.v1.core.kv_cache_coordinator import get_kv_cache_coordinator
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec, SlidingWindowSpec)

    def spec(cls, block_size, **kw):
        return cls(block_size=block_size, num_kv_heads=1, head_size=8, dtype=torch.float32,
                   **kw)

    groups = [KVCacheGroupSpec(["w4"], spec(SlidingWindowSpec, 4, sliding_window=8)),
              KVCacheGroupSpec(["w16"], spec(SlidingWindowSpec, 16, sliding_window=24))]
    if not window_only:
        groups.append(KVCacheGroupSpec(["full"], spec(FullAttentionSpec, 16)))
    config = KVCacheConfig(num_blocks=400, kv_cache_tensors=[], kv_cache_groups=groups)
    return get_kv_cache_coordinator(
        config, max_model_len=512, max_in_flight_tokens=0, use_eagle=False,
        enable_caching=False, enable_kv_cache_events=False, dcp_world_size=1,
        pcp_world_size=1, scheduler_block_size=16, hash_block_size=16)


def _run(coordinator) -> list:
    """Three requests (prompts of 5, 17 and 30 tokens) prefilled, then decoded one token a
    step for 70 steps (windows pass several block boundaries), the second one freed halfway;
    what the coordinator answers and holds after every call."""
    empty = tuple([] for _ in coordinator.single_type_managers)
    computed = {"a": 0, "b": 0, "c": 0}
    prompts = {"a": 5, "b": 17, "c": 30}
    trace = []
    for step in range(71):
        if step == 35:
            coordinator.free("b")
            computed.pop("b")
        for req, done in computed.items():
            new = prompts[req] if step == 0 else 1
            coordinator.remove_skipped_blocks(req, done, prompts[req])
            need = coordinator.get_num_blocks_to_allocate(
                req, done + new, empty, 0, done, done, done + new)
            capped = coordinator.get_num_blocks_to_allocate(
                req, done + new, empty, 0, done, done, done + new, apply_admission_cap=True)
            blocks = coordinator.allocate_new_blocks(req, done + new, done + new)
            held = coordinator.get_blocks(req)
            trace.append((step, req, need, capped, [[b.block_id for b in g] for g in blocks],
                          [[b.block_id for b in g] for g in held],
                          coordinator.block_pool.get_num_free_blocks()))
            computed[req] = done + new
    return trace


def test_one_pass_bookkeeping_equals_vllms_per_group_methods(unpatched):
    expected = _run(_coordinator())
    assert v4_sched.install()
    assert v4_sched.installed()
    patched = _coordinator()
    assert v4_sched.plan(patched) is not None  # the one-pass path ran
    assert _run(patched) == expected


def test_the_trace_sees_windows_free_and_allocate_blocks(unpatched):
    trace = _run(_coordinator(window_only=True))
    free = [row[-1] for row in trace]
    assert min(free) < free[0] and len(set(free)) > 3  # blocks come and go
    assert any(row[0] > 0 and row[2] > 0 for row in trace)  # decode steps that need a block


def test_a_group_of_another_kind_keeps_vllms_methods(unpatched):
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    coordinator = _coordinator()

    class Other(FullAttentionManager):
        pass

    coordinator.single_type_managers[2].__class__ = Other
    assert v4_sched.plan(coordinator) is None


def test_nothing_is_patched_where_vllms_methods_differ(unpatched, monkeypatch):
    monkeypatch.setitem(v4_sched._FINGERPRINTS,
                        "KVCacheCoordinator.allocate_new_blocks", "0" * 16)
    assert not v4_sched.install()
    assert not v4_sched.installed()
