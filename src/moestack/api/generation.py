"""The generation path shared by chat and completions: first-token wait, streaming, usage record.

A request's stream is opened and its first chunk awaited before any HTTP response starts, so every
failure that happens before the first token becomes a proper status code. After that, failures
become an error event in the stream. Whatever happens (finish, failure, client disconnect), exactly
one :class:`RequestRecord` is emitted to the usage sinks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio

from moestack.api.backend import ModelBackend
from moestack.config.schema import MoestackConfig
from moestack.engine.protocol import GenerationChunk, GenerationRequest
from moestack.errors import EngineUnavailableError, ModelNotFoundError, MoestackError

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's convention for "client closed the request"


@dataclass(frozen=True)
class RequestRecord:
    """What one request did, for the usage ledger and metrics."""

    request_id: str
    model: str
    endpoint: str
    stream: bool
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_s: float | None
    e2e_s: float
    error_code: str | None = None
    tenant: str | None = None
    """Tenant the request was authenticated as; None when tenancy is off."""
    key_id: str | None = None


class UsageSink(Protocol):
    def record(self, record: RequestRecord) -> None: ...


class AdmissionTicket(Protocol):
    request: GenerationRequest
    """The request to send to the engine (e.g. with the tenant's priority set)."""

    async def settle(self, record: RequestRecord) -> RequestRecord:
        """Settle what admission reserved with the real usage; returns the record to emit."""


class Admission(Protocol):
    """Runs before the backend is called (auth, limits, budget reservation, fair queue).

    Raises the error to answer (401/403/429) or returns a ticket the service settles exactly once,
    in the same shielded path that emits the usage record.
    """

    async def admit(self, model: str, request: GenerationRequest, endpoint: str,
                    stream: bool) -> AdmissionTicket: ...


class GenerationService:
    """Runs generations through a :class:`ModelBackend` and reports them to sinks."""

    def __init__(self, config: MoestackConfig, backend: ModelBackend,
                 sinks: Sequence[UsageSink] = (), admission: Admission | None = None):
        self.config = config
        self.backend = backend
        self.sinks = list(sinks)
        self.admission = admission

    def check_model(self, model: str) -> None:
        if self.config.model(model) is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    async def open_stream(self, model: str, request: GenerationRequest, endpoint: str,
                          stream: bool) -> AsyncIterator[GenerationChunk]:
        """Open a generation and wait for its first chunk; raises if it fails before that."""
        self.check_model(model)
        started = time.monotonic()
        ticket = None
        if self.admission is not None:
            ticket = await self.admission.admit(model, request, endpoint, stream)
            request = ticket.request
        timeout_s = self.config.gateway.first_token_timeout_s
        emit = (request, model, endpoint, stream, started, None, None)
        try:
            agen = self.backend.generate(model, request)
            first = await asyncio.wait_for(anext(agen), timeout=timeout_s)
        except StopAsyncIteration:
            err = EngineUnavailableError("the engine ended the request without output")
            await self._emit(*emit, err, ticket)
            raise err from None
        except asyncio.TimeoutError:
            await agen.aclose()
            err = EngineUnavailableError(f"no output from the engine within {timeout_s:g} s")
            await self._emit(*emit, err, ticket)
            raise err from None
        except MoestackError as err:
            await self._emit(*emit, err, ticket)
            raise
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):  # client gone before the first token
                await agen.aclose()
                await self._emit(*emit, _ClientClosed(), ticket)
            raise
        except Exception:
            # A bug, not an engine error: still record it (and release what admission holds),
            # then let the app's last-resort handler answer 500.
            await self._emit(*emit, MoestackError("internal error", code="internal_error"),
                             ticket)
            raise
        return self._rest(agen, first, request, model, endpoint, stream, started, ticket)

    async def _rest(self, agen, first, request, model, endpoint, stream, started, ticket):
        ttft_s = time.monotonic() - started
        last, error, closed = first, None, True
        try:
            yield first
            async for chunk in agen:
                last = chunk
                yield chunk
            closed = False
        except MoestackError as err:
            error, closed = err, False
            raise
        finally:
            # Shielded: the client may have gone and the surrounding scope be cancelled, but the
            # engine request must still be aborted and the usage recorded exactly once.
            with anyio.CancelScope(shield=True):
                await agen.aclose()
                if closed and last.finish_reason is None:
                    error = _ClientClosed()
                await self._emit(request, model, endpoint, stream, started, ttft_s, last, error,
                                 ticket)

    async def complete(self, model: str, request: GenerationRequest,
                       endpoint: str) -> tuple[str, GenerationChunk]:
        """Run to the end; returns the full text and the last chunk (finish reason, usage)."""
        chunks = await self.open_stream(model, request, endpoint, stream=False)
        parts, last = [], None
        async for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last

    async def _emit(self, request, model, endpoint, stream, started, ttft_s, last, error,
                    ticket=None) -> None:
        status = 200 if error is None else (
            CLIENT_CLOSED if isinstance(error, _ClientClosed) else error.status_code)
        rec = RequestRecord(
            request_id=request.request_id, model=model, endpoint=endpoint, stream=stream,
            status_code=status, prompt_tokens=last.prompt_tokens if last else 0,
            completion_tokens=last.completion_tokens if last else 0,
            cached_prompt_tokens=last.cached_prompt_tokens if last else 0,
            ttft_s=ttft_s, e2e_s=time.monotonic() - started,
            error_code=getattr(error, "code", None))
        if ticket is not None:
            rec = await ticket.settle(rec)
        for sink in self.sinks:
            try:
                sink.record(rec)
            except Exception:  # fail open on purpose: a broken sink must not fail the request
                log.exception("usage sink %r failed for request %s", sink, rec.request_id)


class _ClientClosed(Exception):
    code = "client_closed"
