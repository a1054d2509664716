"""ModelServer: the Ray Serve deployment that runs one engine per replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.engine import build_engine
from moestack.engine.protocol import EngineStats, GenerationChunk, GenerationRequest


class ModelServer:
    """One replica: builds and starts the engine the model config names."""

    async def __init__(self, model_config: dict[str, Any], cache_dir: str | None = None):
        self.config = ModelConfig.model_validate(model_config)
        self.engine = build_engine(self.config, Path(cache_dir) if cache_dir else None)
        await self.engine.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.engine.generate(request):
            yield chunk

    async def check_health(self) -> None:
        """Called by Ray Serve periodically; raising marks the replica unhealthy."""
        await self.engine.check_health()

    async def health(self) -> None:
        """Same probe, callable through a handle by the gateway's /health."""
        await self.engine.check_health()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
