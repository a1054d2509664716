"""Registering a LoRA adapter: check it against its base model, then store it.

The admin API (``POST /admin/v1/adapters``) and ``moestack adapters add`` both call
:func:`check_and_register`: the base model must be a configured model with LoRA on, the name
must not be a model's (409), and the directory must pass
:func:`moestack.adapters.inspect_adapter` against the base checkpoint's ``config.json`` and the
model's ``max_lora_rank``, and name a matching ``base_model_name_or_path`` if it names one (400
``base_model_mismatch``); then :func:`moestack.tenancy.adapters.register_adapter` stores it with
its content hash and rank.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from moestack.adapters import AdapterInfo, inspect_adapter
from moestack.config.schema import ModelConfig, MoestackConfig
from moestack.engine.source import resolve_checkpoint
from moestack.errors import ConfigError, ConflictError, InvalidAdapterError, InvalidRequestError
from moestack.tenancy.adapters import AdapterRecord, register_adapter
from moestack.tenancy.store import TenancyStore

DEFAULT_MAX_LORA_RANK = 16
"""vLLM's default ``max_lora_rank``."""


def _base_model(config: MoestackConfig, name: str) -> ModelConfig:
    model = config.model(name)
    if model is None:
        raise InvalidRequestError(f"no model named `{name}` in the config (models: "
                                  f"{', '.join(m.name for m in config.models)})",
                                  param="base_model", code="unknown_model")
    if not model.lora_engine_args().get("enable_lora"):
        raise InvalidRequestError(f"model `{name}` serves no LoRA adapters: set "
                                  f"models[{name}].lora.enabled (with max_lora_rank, max_loras)",
                                  param="base_model", code="lora_disabled")
    return model


def max_lora_rank(model: ModelConfig) -> int:
    """The largest rank the model's replicas serve (vLLM's ``max_lora_rank``)."""
    return int(model.lora_engine_args().get("max_lora_rank", DEFAULT_MAX_LORA_RANK))


def _names_of(model: ModelConfig, checkpoint: Path) -> set[str]:
    """What an adapter's ``base_model_name_or_path`` may say for this model (case-insensitive,
    whole or by its last path component)."""
    names = {model.name, checkpoint.name, str(checkpoint)}
    if model.path is not None:
        names |= {str(model.path), model.path.name}
    return {n.lower() for n in names} | {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in names}


def check_adapter(config: MoestackConfig, base_model: str, path: str | Path) -> AdapterInfo:
    """Check the adapter at ``path`` against ``base_model`` of ``config``; returns what
    :func:`inspect_adapter` found, or raises a 400 naming what is wrong."""
    model = _base_model(config, base_model)
    try:
        checkpoint = resolve_checkpoint(model, config.cache_dir)
    except ConfigError as exc:  # the checkpoint is not readable where registration runs
        raise InvalidRequestError(f"cannot check the adapter against model `{base_model}`: "
                                  f"{exc.message}", param="base_model",
                                  code="base_checkpoint_unreadable") from None
    base_config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    info = inspect_adapter(path, base_config, max_lora_rank(model))
    trained_on = info.base_model_name
    if trained_on and not ({trained_on.lower(), trained_on.rstrip("/").rsplit("/", 1)[-1].lower()}
                           & _names_of(model, checkpoint)):
        raise InvalidAdapterError(
            f"the adapter was trained on `{trained_on}` (its base_model_name_or_path), not on "
            f"model `{base_model}` (checkpoint {checkpoint.name})", param="base_model",
            code="base_model_mismatch")
    return info


def check_and_register(store: TenancyStore, config: MoestackConfig, *, name: str,
                       base_model: str, path: str | Path, owner: str,
                       shared_with: Iterable[str] = (),
                       usd_per_1m_tokens: float | None = None) -> AdapterRecord:
    """Check and register an adapter: 400 for a bad adapter or setting, 404 for an unknown
    tenant, 409 for a name taken by a model or another adapter."""
    if config.model(name) is not None:
        raise ConflictError(f"`{name}` is the name of a configured model; an adapter needs a "
                            "name of its own", param="name", code="name_taken_by_model")
    path = str(Path(path).expanduser().absolute())
    info = check_adapter(config, base_model, path)
    return register_adapter(store, name=name, base_model=base_model, path=path,
                            sha256=info.content_sha256, rank=info.rank, owner=owner,
                            shared_with=shared_with, usd_per_1m_tokens=usd_per_1m_tokens)
