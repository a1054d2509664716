"""The gateway's :class:`ModelBackend` over Ray Serve deployment handles."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from moestack.engine.protocol import EngineChunk, EngineInfo, EngineRequest
from moestack.errors import (
    EngineUnavailableError,
    ModelNotFoundError,
    MoestackError,
    ReplicaDrainingError,
)
from moestack.routing.router import ROUTERS, Router
from moestack.routing.types import ReplicaTarget

HEALTH_TIMEOUT_S = 10.0
REMOVE_ADAPTER_TIMEOUT_S = 60.0
"""How long removing an adapter waits for each replica (a replica stuck longer is failing)."""
DEFAULT_MAX_ATTEMPTS = 3

log = logging.getLogger(__name__)


def _translate(exc: BaseException) -> MoestackError:
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, MoestackError):
        return exc.cause
    if isinstance(exc, BackPressureError):
        return EngineUnavailableError("all replicas of the model are at capacity; retry later")
    return EngineUnavailableError(f"the model replica failed: {type(exc).__name__}")


_RAY_ERRORS = (RayTaskError, RayActorError, BackPressureError, DeploymentUnavailableError)


def _replica_failed(exc: BaseException) -> bool:
    """The replica died or its engine failed: another replica may serve the request."""
    if isinstance(exc, RayTaskError):
        return isinstance(exc.cause, EngineUnavailableError)
    return isinstance(exc, RayActorError)


class ServeBackend:
    def __init__(self, handles: Mapping[str, DeploymentHandle],
                 max_attempts: Mapping[str, int] | None = None):
        self.handles = dict(handles)
        self._streaming = {m: h.options(stream=True) for m, h in self.handles.items()}
        self.max_attempts = dict(max_attempts or {})
        """Per model: attempts on replicas while no token has been produced (failover)."""
        self.failovers: Counter[str] = Counter()
        """Per model: requests retried on another replica after one failed before any token."""
        self.drained: Counter[str] = Counter()
        """Per model: streams ended on a draining replica to go on on a live one."""

    def _handle(self, model: str) -> DeploymentHandle:
        try:
            return self.handles[model]
        except KeyError:
            raise ModelNotFoundError.of(model) from None

    async def info(self, model: str) -> EngineInfo:
        try:
            return await self._handle(model).info.remote()
        except _RAY_ERRORS as exc:
            raise _translate(exc) from None

    async def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream from a replica; if it fails before its first chunk, retry on another one.

        Once a chunk was yielded a failure is final (the client has seen tokens): it becomes
        :class:`EngineUnavailableError`, which the API turns into an error event (or which
        the gateway's migration resumes). A resumable stream that sets
        :attr:`EngineRequest.drain_after_s` ends with :class:`ReplicaDrainingError` that long
        after its replica began draining, if another replica is live (:meth:`_drained`).
        """
        self._handle(model)
        handle = self._streaming[model]
        attempts = self.max_attempts.get(model, DEFAULT_MAX_ATTEMPTS)
        for attempt in range(1, attempts + 1):
            stream = handle.serve.remote(request)
            finished = streamed = False
            left: dict[str, float] = {}  # the router's Router.left, once the stream may move
            router: Router | None = None
            try:
                async for chunk in stream:
                    if not streamed and request.drain_after_s is not None and (
                            chunk.prompt_token_ids is not None or request.resume_prompt_tokens):
                        router = ROUTERS.get((handle.app_name, model))
                        left = router.left if router is not None else left
                    streamed = True
                    yield chunk
                    if left and self._drained(model, request, router):
                        finished = True
                        stream.cancel()  # the draining replica aborts it and can stop
                        raise ReplicaDrainingError(
                            "the model replica is draining; resuming on another replica")
                finished = True
                return
            except _RAY_ERRORS as exc:
                finished = True
                if streamed or attempt == attempts or not _replica_failed(exc):
                    raise _translate(exc) from None
                self.failovers[model] += 1
                log.warning("request %s: replica failed before the first token (%s); "
                            "retrying on another replica (attempt %d of %d)",
                            request.request_id, type(exc).__name__, attempt + 1, attempts)
            finally:
                if not finished:
                    stream.cancel()  # client gone: cancels the replica's generator, which aborts

    def _drained(self, model: str, request: EngineRequest, router: Router) -> bool:
        """Whether to move ``request`` off its replica: the replica left the live set at least
        ``request.drain_after_s`` ago, and another replica is live to resume it on."""
        since = router.left.get(request.request_id)
        if since is None or time.monotonic() - since < request.drain_after_s:
            return False
        if not router.replica_ids:
            return False  # nowhere to go: it finishes (or fails over) as before
        self.drained[model] += 1
        log.info("request %s: its replica is draining; moving it to a live replica",
                 request.request_id)
        return True

    async def remove_adapter(self, model: str, name: str) -> None:
        """Unload ``name`` on every live replica of ``model``.

        Serve handles do not broadcast, so: one call through the handle (any replica; it also
        starts this process's request router for the model, which Serve keeps told of the live
        replicas), then one call pinned to each other live replica by a
        :class:`~moestack.routing.types.ReplicaTarget` (:mod:`moestack.routing.ray_router`). A
        replica that starts meanwhile holds no adapter; one that dies holds nothing any more.
        """
        handle = self._handle(model)
        router = ROUTERS.get((handle.app_name, model))
        if router is not None and router.counts.live_replicas == 0:
            return  # scaled to zero: nothing holds it (and a call would start a replica)
        try:
            first = await asyncio.wait_for(handle.remove_adapter.remote(name),
                                           REMOVE_ADAPTER_TIMEOUT_S)
            router = ROUTERS.get((handle.app_name, model))
            others = sorted((router.replica_ids if router is not None else frozenset())
                            - {first})
            await asyncio.wait_for(
                asyncio.gather(*(handle.remove_adapter.remote(name, ReplicaTarget(rid))
                                 for rid in others)), REMOVE_ADAPTER_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"a replica of {model} did not remove adapter {name} "
                                         f"within {REMOVE_ADAPTER_TIMEOUT_S:g} s") from None
        except _RAY_ERRORS as exc:
            raise _translate(exc) from None
        if router is not None:
            router.adapters.remove(name)
        log.info("removed adapter %s from %d replica(s) of %s", name, 1 + len(others), model)

    async def check_health(self) -> dict[str, str | None]:
        async def probe(handle: DeploymentHandle) -> str | None:
            try:
                await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
                return None
            except asyncio.TimeoutError:
                return f"no answer within {HEALTH_TIMEOUT_S:g} s"
            except _RAY_ERRORS as exc:
                return _translate(exc).message
        names = list(self.handles)
        results = await asyncio.gather(*(probe(self.handles[n]) for n in names))
        return dict(zip(names, results))
