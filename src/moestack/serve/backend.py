"""The gateway's :class:`ModelBackend` over Ray Serve deployment handles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from moestack.engine.protocol import GenerationChunk, GenerationRequest
from moestack.errors import EngineUnavailableError, ModelNotFoundError, MoestackError

HEALTH_TIMEOUT_S = 10.0


def _translate(exc: BaseException) -> MoestackError:
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, MoestackError):
        return exc.cause
    if isinstance(exc, BackPressureError):
        return EngineUnavailableError("all replicas of the model are at capacity; retry later")
    return EngineUnavailableError(f"the model replica failed: {type(exc).__name__}")


_RAY_ERRORS = (RayTaskError, RayActorError, BackPressureError, DeploymentUnavailableError)


class ServeBackend:
    def __init__(self, handles: Mapping[str, DeploymentHandle]):
        self.handles = dict(handles)

    def _handle(self, model: str) -> DeploymentHandle:
        try:
            return self.handles[model]
        except KeyError:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model") from None

    async def generate(self, model: str,
                       request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        stream = self._handle(model).options(stream=True).generate.remote(request)
        finished = False
        try:
            async for chunk in stream:
                finished = chunk.finish_reason is not None
                yield chunk
        except _RAY_ERRORS as exc:
            finished = True
            raise _translate(exc) from None
        finally:
            if not finished:
                stream.cancel()  # client gone: cancels the replica's generator, which aborts

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
