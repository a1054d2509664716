"""Check a PEFT LoRA adapter directory against its base model, without an engine.

Registration runs this so that a bad adapter gets a clear 400 when it is added, not a failure
at its first request: the directory and its two files (``adapter_config.json``,
``adapter_model.safetensors``), the config's fields, the rank against the model's
``max_lora_rank`` (vLLM's own rule: the largest of ``r`` and ``rank_pattern``), and every
tensor's name, dtype and shape against the base's layers and projections
(:mod:`moestack.adapters.shapes`). Tensors are read from the safetensors header alone: no
weights are loaded, and nothing here imports torch.

The content hash is SHA-256 over ``adapter_config.json`` then ``adapter_model.safetensors``,
each as its name, a NUL byte, its size in decimal, a NUL byte, and its bytes: the same files
always hash the same, and a change to either (even a rename of the weights) changes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moestack.adapters.shapes import BaseShape, base_shape
from moestack.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
"""The files an adapter is made of, in the order they are hashed."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors format's own bound on the JSON header."""
_DTYPES = frozenset({"F32", "F16", "BF16"})
_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What registration keeps of a checked adapter."""

    rank: int
    """The largest LoRA rank it uses (``r``, or a larger ``rank_pattern`` entry)."""
    alpha: float
    target_modules: tuple[str, ...]
    """The base's modules it adapts, sorted."""
    base_model_name: str | None
    """``base_model_name_or_path`` from its config, as its trainer wrote it."""
    content_sha256: str
    size_bytes: int
    """Bytes of its two files together."""


def inspect_adapter(path: str | Path, base_checkpoint_config: Mapping[str, Any],
                    max_lora_rank: int) -> AdapterInfo:
    """Check the adapter at ``path`` against a base checkpoint's ``config.json`` and the model's
    ``max_lora_rank``; raise :class:`InvalidAdapterError` naming the first thing wrong."""
    root = Path(path)
    if not root.exists():
        raise InvalidAdapterError(f"adapter directory {root} does not exist", param="path")
    if not root.is_dir():
        raise InvalidAdapterError(f"adapter path {root} is not a directory", param="path")
    config = _read_config(root)
    rank, alpha, targets = _check_config(config, max_lora_rank)
    shape = base_shape(base_checkpoint_config)
    if isinstance(targets, list):
        if unknown := sorted(set(targets) - set(shape.projections)):
            raise InvalidAdapterError(
                f"{CONFIG_FILE}: target module(s) {', '.join(unknown)} are not adaptable "
                f"modules of the base {shape.architecture} (it has: "
                f"{', '.join(shape.projections)})", param="path")
    tensors = _read_header(root / WEIGHTS_FILE)
    used = _check_tensors(tensors, shape, config, rank,
                          set(targets) if isinstance(targets, list) else None)
    return AdapterInfo(
        rank=rank, alpha=alpha, target_modules=tuple(sorted(used)),
        base_model_name=config.get("base_model_name_or_path"),
        content_sha256=content_sha256(root),
        size_bytes=sum((root / name).stat().st_size for name in ADAPTER_FILES))


def content_sha256(root: Path) -> str:
    """The adapter's content hash (see the module docstring)."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        file = root / name
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _read_config(root: Path) -> dict[str, Any]:
    file = root / CONFIG_FILE
    if not file.is_file():
        raise InvalidAdapterError(f"{root} has no {CONFIG_FILE} (a PEFT LoRA adapter directory "
                                  f"holds {CONFIG_FILE} and {WEIGHTS_FILE})", param="path")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}",
                                  param="path") from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object", param="path")
    return config


def _check_config(config: dict[str, Any], max_lora_rank: int
                  ) -> tuple[int, float, list[str] | str]:
    """The adapter's largest rank, alpha and target modules (a list, or PEFT's regex string)."""
    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{CONFIG_FILE}: {message}", param="path")

    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise bad(f"peft_type is {peft_type!r}; only LoRA adapters are served")
    r = config.get("r")
    if not _positive_int(r):
        raise bad(f"`r` (the LoRA rank) must be a positive integer, got {r!r}")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_positive_int(v) for v in pattern.values()):
        raise bad("`rank_pattern` must map module names to positive integer ranks")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise bad(f"`lora_alpha` must be a positive number, got {alpha!r}")
    targets = config.get("target_modules")
    if not ((isinstance(targets, str) and targets)
            or (isinstance(targets, list) and targets
                and all(isinstance(t, str) and t for t in targets))):
        raise bad("`target_modules` must be a non-empty list of module names (or PEFT's "
                  "pattern string)")
    if config.get("use_dora"):
        raise bad("DoRA adapters (`use_dora`) are not supported by vLLM")
    if config.get("bias", "none") != "none":
        raise bad(f"adapter bias ({config['bias']!r}) is not supported by vLLM; it must be "
                  "'none'")
    if config.get("modules_to_save"):
        raise bad("`modules_to_save` (full copies of base modules) is not supported")
    rank = max([r, *pattern.values()])
    if rank > max_lora_rank:
        raise bad(f"LoRA rank {rank} is over the model's max_lora_rank {max_lora_rank}")
    return rank, float(alpha), targets


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header, checked against the file's size."""
    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{WEIGHTS_FILE}: {message}", param="path")

    if not file.is_file():
        raise InvalidAdapterError(f"{file.parent} has no {WEIGHTS_FILE} (the adapter's weights "
                                  "in safetensors format; pickled .bin weights are not "
                                  "accepted)", param="path")
    size = file.stat().st_size
    if size == 0:
        raise bad("the file is empty")
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("the file is too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise bad("not a safetensors file (its header length does not fit the file)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise bad("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    if not header:
        raise bad("the file holds no tensors")
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]
                or not isinstance(shape, list) or not all(isinstance(d, int) for d in shape)):
            raise bad(f"tensor {name} has a malformed header entry")
        end = max(end, offsets[1])
    if 8 + header_len + end > size:
        raise bad(f"the file is truncated ({size} bytes, its header needs {8 + header_len + end})")
    return header


def _check_tensors(tensors: dict[str, dict[str, Any]], shape: BaseShape, config: dict[str, Any],
                   rank: int, targets: set[str] | None) -> set[str]:
    """Check every tensor against the base; returns the modules the adapter adapts."""
    def bad(message: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{WEIGHTS_FILE}: {message}", param="path")

    by_path = {p.path: (name, p) for name, p in shape.projections.items()}
    pairs: dict[tuple[int, str], dict[str, list[int]]] = {}
    for tensor, entry in sorted(tensors.items()):
        match = _TENSOR.match(tensor)
        if match is None:
            raise bad(f"tensor {tensor} is not a LoRA weight of a decoder layer (expected "
                      "base_model.model.model.layers.<N>.<module path>.lora_A/B.weight)")
        layer, path, part = int(match[1]), match[2], match[3]
        if layer >= shape.num_layers:
            raise bad(f"tensor {tensor} is for layer {layer}, but the base {shape.architecture} "
                      f"has {shape.num_layers} layers")
        if path not in by_path:
            raise bad(f"tensor {tensor} adapts {path}, which is not an adaptable module of the "
                      f"base {shape.architecture} (it has: {', '.join(shape.projections)})")
        module = by_path[path][0]
        if targets is not None and module not in targets:
            raise bad(f"tensor {tensor} adapts {module}, which {CONFIG_FILE}'s target_modules "
                      "does not list")
        if entry.get("dtype") not in _DTYPES:
            raise bad(f"tensor {tensor} has dtype {entry.get('dtype')}; expected one of "
                      f"{', '.join(sorted(_DTYPES))}")
        pairs.setdefault((layer, path), {})[part] = entry["shape"]
    fixed_rank = None if config.get("rank_pattern") else config["r"]
    for (layer, path), parts in sorted(pairs.items()):
        proj = by_path[path][1]
        if set(parts) != {"A", "B"}:
            (only,) = parts
            raise bad(f"layer {layer} {path} has lora_{only} but no "
                      f"lora_{'B' if only == 'A' else 'A'}")
        a, b = parts["A"], parts["B"]
        r = a[0] if len(a) == 2 else None
        expected_r = fixed_rank or r
        if (len(a) != 2 or len(b) != 2 or r is None or not 0 < r <= rank or r != expected_r
                or a[1] != proj.in_features or b != [proj.out_features, r]):
            want_r = expected_r if fixed_rank else "r"
            raise bad(f"layer {layer} {path}: lora_A is {a} and lora_B is {b}, but the base "
                      f"{shape.architecture} needs lora_A [{want_r}, {proj.in_features}] and "
                      f"lora_B [{proj.out_features}, {want_r}]"
                      + ("" if fixed_rank else f" with r at most {rank}"))
    return {by_path[path][0] for _, path in pairs}
