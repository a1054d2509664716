"""The gateway's data path: take a request through the hooks to an engine, relay the answer.

The body goes to the engine as the client sent it, plus the ``priority`` and the tenant's
``cache_salt`` that the hooks put on the request context (overriding the client's); the answer's
bytes come back as the engine's serving layer produced them. The request's
:class:`~moestack.hooks.RequestContext` comes authenticated from the route
(:func:`moestack.api.context.request_context`); what this module adds:

* before the engine, in this order: body checks that need no model (JSON, types, bounds, invalid
  Unicode), the model resolved for the caller (a model outside the principal's list is the same
  404 as a missing one), the model's request limits, the fields its engine would ignore (see
  :mod:`moestack.api.endpoints`), then the hooks' ``before_inference`` (admission, fair queue);
* the wait for the first chunk, raced against the client leaving and bounded by
  ``gateway.first_token_timeout_s``, so every failure before the first byte is a proper status;
* after it: bytes relayed as they come; a failure mid-stream becomes the stream's error event;
* exactly one :class:`~moestack.usage.RequestRecord` per request that entered the hooks, with
  the engine's own usage (the cumulative figure on the last chunk received), whatever happens:
  finish, engine error, client gone (499), handed to the hooks' ``on_complete`` (metering
  prices it, the fair queue frees the slot, tenancy settles the ledger) in a shielded
  ``finally``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from moestack.api.backend import ModelBackend
from moestack.api.catalog import resolve_model
from moestack.api.chain import HookChain
from moestack.api.disconnect import until_disconnected
from moestack.api.endpoints import (
    Endpoint,
    check_fields,
    check_limits,
    ends_stream,
    read_body,
    with_member,
    with_priority,
)
from moestack.api.errors import sse_error_event
from moestack.api.migration import Migrator
from moestack.api.overflow import Overflow
from moestack.config.schema import MoestackConfig
from moestack.engine.protocol import AdapterRef, EngineChunk, EngineInfo, EngineRequest
from moestack.errors import (
    EngineUnavailableError,
    MoestackError,
    NotFoundError,
)
from moestack.hooks import RequestContext
from moestack.routing.prefix import salted
from moestack.scheduling.hook import QueueWaitExceeded
from moestack.tenancy.adapters import AdapterCatalog
from moestack.usage import CLIENT_CLOSED, NO_USAGE, RequestRecord, Usage

REQUEST_ID_HEADER = "x-moestack-request-id"
"""Response header naming the request's id in the usage ledger (Ray Serve's proxy sets its own
``x-request-id``)."""


class Relay:
    """Relays API calls to engines through a :class:`ModelBackend`, through ``hooks``."""

    def __init__(self, config: MoestackConfig, backend: ModelBackend, hooks: HookChain,
                 adapters: AdapterCatalog | None = None):
        self.config = config
        self.migrator = Migrator(config, backend)  # resumes streams whose replica died
        self.hooks = hooks
        self.adapters = adapters
        self.overflow: Overflow | None = None  # set by build_api when overflow is configured
        self._infos: dict[str, EngineInfo] = {}

    @property
    def backend(self) -> ModelBackend:
        """The engines' backend (the migrator's: requests go through it)."""
        return self.migrator.backend

    @backend.setter
    def backend(self, backend: ModelBackend) -> None:
        self.migrator.backend = backend

    async def engine_info(self, model: str) -> EngineInfo:
        """The model's engine description, fetched from a replica once."""
        info = self._infos.get(model)
        if info is None:
            info = self._infos[model] = await self.backend.info(model)
        return info

    async def handle(self, request: Request, endpoint: Endpoint,
                     ctx: RequestContext) -> Response:
        """Answer one API call (the route function of every relayed endpoint) for ``ctx``, the
        request's authenticated context."""
        started = time.monotonic()
        raw = await request.body()
        facts, fields = read_body(endpoint, raw)
        model, adapter = await resolve_model(self.config, self.adapters, ctx.principal,
                                             facts.model)  # missing or not the caller's: 404
        if adapter is not None:  # the hooks see the base model; the body keeps the adapter
            facts = dataclasses.replace(facts, model=model.name)
            ctx.adapter, ctx.adapter_usd_per_1m_tokens = adapter.name, adapter.usd_per_1m_tokens
        check_limits(endpoint, facts, model.request_limits)
        ctx.endpoint, ctx.facts = endpoint.name, facts
        ctx.tokens = facts.token_bound(model.max_model_len, endpoint.generates)
        call = _Call(self, endpoint, ctx, started, adapter.ref() if adapter else None)
        call.client_headers = request.headers  # what an overflow provider is told (API version)
        opening = asyncio.ensure_future(call.open(raw, fields))
        left = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({opening, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not opening.done():  # the client left first: cancel admission / the engine
                opening.cancel()
        try:
            first, chunks = await opening
        except asyncio.CancelledError:
            if not left.cancelled() and left.done():
                return Response(status_code=CLIENT_CLOSED)
            raise
        headers = {REQUEST_ID_HEADER: ctx.request_id}
        if first.content_type and first.content_type.startswith("text/event-stream") \
                and first.status < 400:
            return StreamingResponse(call.stream(first, chunks), status_code=first.status,
                                     media_type=first.content_type, headers=headers)
        body = await call.whole(first, chunks)
        return Response(body, status_code=first.status, media_type=first.content_type,
                        headers=headers)


class _Call:
    """One relayed request from the hooks' ``before_inference`` to its usage record."""

    def __init__(self, relay: Relay, endpoint: Endpoint, ctx: RequestContext, started: float,
                 adapter_ref: AdapterRef | None = None):
        self.relay, self.endpoint, self.ctx, self.facts = relay, endpoint, ctx, ctx.facts
        self.adapter_ref = adapter_ref
        self.started = started
        self.usage: Usage = NO_USAGE
        self.ttft_s: float | None = None
        self._emitted = False

    async def open(self, raw: bytes, fields: frozenset[str]
                   ) -> tuple[EngineChunk, AsyncIterator[EngineChunk]]:
        """Run the hooks, send, and wait for the first chunk; raises (after recording) if it
        fails."""
        relay, facts, ctx = self.relay, self.facts, self.ctx
        info = await relay.engine_info(facts.model)
        if self.endpoint.path not in info.request_fields:
            raise NotFoundError(f"The model `{facts.model}` does not serve "
                                f"{self.endpoint.path}.", code="unsupported_endpoint")
        accepted = info.request_fields[self.endpoint.path]
        check_fields(self.endpoint, fields, accepted)
        chunks = None
        try:
            try:
                await relay.hooks.before_inference(ctx)
            except QueueWaitExceeded:  # overflow's bound passed in the fair queue
                await relay.overflow.after_queue_wait(ctx)  # a provider, or wait on unbounded
                await relay.hooks.before_inference(ctx)
            sent = raw  # the client's body, for an overflow provider
            if "priority" in accepted:
                raw = with_priority(raw, ctx.priority if info.priority_scheduling else 0)
            if ctx.cache_salt and "cache_salt" in accepted:  # the tenant's, whatever was sent
                raw = with_member(raw, "cache_salt", ctx.cache_salt)
            chunks = relay.migrator.serve(facts.model, EngineRequest(
                request_id=ctx.request_id, path=self.endpoint.path, body=raw,
                tenant=ctx.tenant, prompt_text=salted(facts.prompt_text, ctx.cache_salt),
                estimated_tokens=ctx.tokens.total,
                adapter=self.adapter_ref))
            if ctx.backend != "replica":  # overflow (moestack.api.overflow): a provider answers
                chunks = relay.overflow.serve(ctx, sent, self.client_headers)
            timeout_s = relay.config.gateway.first_token_timeout_s
            try:
                try:
                    first = await asyncio.wait_for(anext(chunks), timeout=timeout_s)
                except EngineUnavailableError:  # no replica could take it: overflow, if allowed
                    if relay.overflow is None or not await relay.overflow.take_over(ctx):
                        raise
                    await chunks.aclose()
                    chunks = relay.overflow.serve(ctx, sent, self.client_headers)
                    first = await asyncio.wait_for(anext(chunks), timeout=timeout_s)
            except StopAsyncIteration:
                raise EngineUnavailableError("the engine ended the request without output"
                                             ) from None
            except asyncio.TimeoutError:
                raise EngineUnavailableError(f"no output from the engine within {timeout_s:g} s"
                                             ) from None
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if chunks is not None:
                    await chunks.aclose()
                await self.finish(_status_of(exc), _code_of(exc))
            raise
        self.ttft_s = time.monotonic() - self.started
        self.usage = first.usage
        return first, chunks

    async def answer(self, first: EngineChunk, chunks: AsyncIterator[EngineChunk]
                    ) -> AsyncIterator[bytes]:
        """The answer's bytes as they come; records the request once they end, however they
        end (a failure is recorded and re-raised). Close it, finished or not."""
        status, code = CLIENT_CLOSED, "client_closed"
        last = first.data
        try:
            yield first.data
            async for chunk in chunks:
                self.usage = chunk.usage
                if chunk.data:
                    last = chunk.data
                    yield chunk.data
            status = first.status
            code = _engine_error_code(first) if status >= 400 else None
        except MoestackError as exc:
            status, code = exc.status_code, exc.code
            raise
        finally:
            if status == CLIENT_CLOSED and self.facts.stream and ends_stream(last):
                # The client had the answer's last event and closed before the engine's end of
                # body reached us (the openai client closes on `[DONE]`): a complete answer.
                status, code = first.status, None
            # Shielded: the client may have gone and the surrounding scope be cancelled, but the
            # engine request must still be aborted and the usage recorded exactly once.
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
                await self.finish(status, code)

    async def stream(self, first: EngineChunk, chunks: AsyncIterator[EngineChunk]
                    ) -> AsyncIterator[bytes]:
        """A streamed answer: a failure mid-stream becomes the stream's error event."""
        async with aclosing(self.answer(first, chunks)) as data:
            try:
                async for piece in data:
                    yield piece
            except MoestackError as exc:
                yield sse_error_event(exc, self.endpoint.anthropic)

    async def whole(self, first: EngineChunk, chunks: AsyncIterator[EngineChunk]) -> bytes:
        """A non-streamed answer, whole."""
        async with aclosing(self.answer(first, chunks)) as data:
            return b"".join([piece async for piece in data])

    async def finish(self, status: int, code: str | None) -> None:
        """Hand the request's record (once) to the hooks that let it through."""
        if self._emitted:
            return
        self._emitted = True
        u, ctx = self.usage, self.ctx
        ctx.record = RequestRecord(
            request_id=ctx.request_id, model=self.facts.model, endpoint=self.endpoint.name,
            stream=self.facts.stream, status_code=status, prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
            ttft_s=self.ttft_s, e2e_s=time.monotonic() - self.started, error_code=code,
            tenant=ctx.tenant, key_id=ctx.principal.key_id if ctx.principal else None,
            backend=ctx.backend,
            adapter=ctx.adapter)
        await self.relay.hooks.on_complete(ctx)


def _engine_error_code(first: EngineChunk) -> str:
    """The ``code``/``type`` of an engine's own error answer, for the ledger."""
    try:
        error = json.loads(first.data).get("error") or {}
        return str(error.get("type") or error.get("code") or f"http_{first.status}")[:64]
    except (ValueError, AttributeError):
        return f"http_{first.status}"


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, MoestackError):
        return exc.status_code
    return CLIENT_CLOSED if isinstance(exc, asyncio.CancelledError) else 500


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, MoestackError):
        return exc.code or exc.error_type
    return "client_closed" if isinstance(exc, asyncio.CancelledError) else "internal_error"
