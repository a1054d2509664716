"""How the API layer reaches engines: a small protocol with an in-process implementation.

The Ray Serve implementation (deployment handles to ModelServer replicas) lives in
:mod:`moestack.serve.backend`; tests use :class:`LocalBackend` over the fake engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from moestack.engine.protocol import Engine, EngineChunk, EngineInfo, EngineRequest
from moestack.errors import EngineUnavailableError, ModelNotFoundError


class ModelBackend(Protocol):
    def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Answer ``request`` on a replica of ``model`` (engine protocol contract)."""

    async def info(self, model: str) -> EngineInfo:
        """What ``model``'s engine serves (routes and their fields, context length)."""

    async def check_health(self) -> dict[str, str | None]:
        """Per model: ``None`` when healthy, else the reason it is not."""


class LocalBackend:
    """Engines running in this process, one per model."""

    def __init__(self, engines: Mapping[str, Engine]):
        self.engines = dict(engines)

    def _engine(self, model: str) -> Engine:
        try:
            return self.engines[model]
        except KeyError:
            raise ModelNotFoundError.of(model) from None

    def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        return self._engine(model).serve(request)

    async def info(self, model: str) -> EngineInfo:
        return self._engine(model).info

    async def check_health(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name, engine in self.engines.items():
            try:
                await engine.check_health()
                out[name] = None
            except EngineUnavailableError as exc:
                out[name] = exc.message
        return out
