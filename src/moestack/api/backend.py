"""How the API layer reaches engines: a small protocol with an in-process implementation.

The Ray Serve implementation (deployment handles to ModelServer replicas) lives in
:mod:`moestack.serve.backend`; tests use :class:`LocalBackend` over the fake engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from moestack.engine.protocol import Engine, EngineChunk, EngineInfo, EngineRequest
from moestack.engine.replica_adapters import ReplicaAdapters
from moestack.errors import EngineUnavailableError, ModelNotFoundError


class ModelBackend(Protocol):
    def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Answer ``request`` on a replica of ``model`` (engine protocol contract). A request
        with ``adapter`` set runs with it: the replica loads it first if it does not hold it
        (:class:`~moestack.errors.InvalidAdapterError` if it cannot)."""

    async def info(self, model: str) -> EngineInfo:
        """What ``model``'s engine serves (routes and their fields, context length)."""

    async def check_health(self) -> dict[str, str | None]:
        """Per model: ``None`` when healthy, else the reason it is not."""

    async def remove_adapter(self, model: str, name: str) -> None:
        """Unload LoRA adapter ``name`` from every live replica of ``model`` (those that do not
        hold it do nothing); returns once each has. The caller first stops routing requests to
        it (the registry); requests already running with it finish."""


class LocalBackend:
    """Engines running in this process, one per model."""

    def __init__(self, engines: Mapping[str, Engine]):
        self.engines = dict(engines)
        self.adapters = {name: ReplicaAdapters(e) for name, e in self.engines.items()}
        """Per model: its engine's adapters, loaded before the requests that name them."""

    def _engine(self, model: str) -> Engine:
        try:
            return self.engines[model]
        except KeyError:
            raise ModelNotFoundError.of(model) from None

    def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        engine = self._engine(model)
        if request.adapter is None:
            return engine.serve(request)
        return self._serve_with_adapter(model, engine, request)

    async def _serve_with_adapter(self, model: str, engine: Engine,
                                  request: EngineRequest) -> AsyncIterator[EngineChunk]:
        await self.adapters[model].ensure(request.adapter)
        answer = engine.serve(request)
        try:
            async for chunk in answer:
                yield chunk
        finally:
            await answer.aclose()

    async def remove_adapter(self, model: str, name: str) -> None:
        self._engine(model)
        await self.adapters[model].remove(name)

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
