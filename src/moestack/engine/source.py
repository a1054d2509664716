"""Where a model's checkpoint comes from: a local folder, or a tiny model built on demand."""

from __future__ import annotations

from pathlib import Path

from moestack.config.schema import ModelConfig
from moestack.engine.tiny import Progress, TinySpec, ensure_tiny_model
from moestack.errors import ConfigError


def resolve_checkpoint(config: ModelConfig, cache_dir: Path | None = None,
                       progress: Progress | None = None) -> Path:
    """The checkpoint folder of ``config``, building and caching a tiny model if asked to."""
    if config.tiny is not None:
        return ensure_tiny_model(TinySpec(config.tiny.arch, config.tiny.seed), cache_dir, progress)
    if config.path is None or not (config.path / "config.json").is_file():
        raise ConfigError(f"models[{config.name}].path: {config.path} is not a checkpoint folder "
                          "(no config.json)")
    return config.path
