"""Engines behind one protocol, built from config through a registry keyed by name.

The registry is the ``moestack.engines`` entry-point group (``pyproject.toml``: ``vllm``, and
``fake``, the test engine of :mod:`moestack.testing`); config checks ``engine:`` against its names
(:func:`moestack.config.schema.engine_names`) and :func:`build_engine` loads the class named.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from moestack.config.schema import ENGINES_GROUP, engine_names
from moestack.engine.protocol import (
    Engine,
    EngineChunk,
    EngineInfo,
    EngineRequest,
    EngineStats,
)
from moestack.errors import ConfigError

if TYPE_CHECKING:
    from moestack.config.schema import ModelConfig


def build_engine(config: ModelConfig, cache_dir: Path | None = None) -> Engine:
    """Instantiate (not start) the engine that ``config.engine`` names."""
    found = entry_points(group=ENGINES_GROUP, name=config.engine)
    if not found:
        raise ConfigError(f"models[{config.name}].engine: unknown engine {config.engine!r}; "
                          f"installed engines: {', '.join(engine_names()) or 'none'}",
                          param="engine")
    engine_cls = next(iter(found)).load()
    return engine_cls(config, cache_dir)


__all__ = [
    "Engine", "EngineChunk", "EngineInfo", "EngineRequest", "EngineStats", "build_engine",
]
