"""Engines behind one protocol, built from config through a registry keyed by name."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from moestack.engine.protocol import (
    Engine,
    EngineChunk,
    EngineInfo,
    EngineRequest,
    EngineStats,
)

if TYPE_CHECKING:
    from moestack.config.schema import ModelConfig

ENGINES: dict[str, str] = {
    "vllm": "moestack.engine.vllm_engine:VLLMEngine",
    "fake": "moestack.testing.fake_engine:FakeEngine",
}


def build_engine(config: "ModelConfig", cache_dir: Path | None = None) -> Engine:
    """Instantiate (not start) the engine that ``config.engine`` names."""
    module, _, cls = ENGINES[config.engine].partition(":")
    return getattr(importlib.import_module(module), cls)(config, cache_dir)


__all__ = [
    "ENGINES", "Engine", "EngineChunk", "EngineInfo", "EngineRequest", "EngineStats",
    "build_engine",
]
