"""External providers as backends: the client's body to the provider, the provider's bytes back.

A :class:`Provider` speaks the engine protocol's output (:class:`~moestack.engine.protocol.
EngineChunk`: the first chunk carries status and content type, every chunk the cumulative usage),
so the gateway's relay treats it like a replica:

* the body goes as the client sent it, with ``model`` set to the provider's model id (the
  gateway's own additions, engine ``priority`` and the tenant's ``cache_salt``, are not sent);
* the answer's bytes come back as the provider sent them, streamed or not, except one thing: an
  OpenAI stream is asked for its usage (``stream_options.include_usage``), and if the client did
  not ask for it, the usage-only chunk is dropped from what the client gets;
* usage is the provider's own figure. An OpenAI stream reports it only at its end: while it runs
  (and for a stream cut short) the usage is the request's prompt-token upper bound plus one token
  per content event relayed. An Anthropic stream reports input tokens at its start and output
  tokens as it goes;
* a provider error answer is relayed with the provider's status and body (4xx stays 4xx, 5xx stays
  5xx; usage 0), except 401/403, the gateway's own credentials being refused, which is a 502 that
  does not blame the client's key; no answer at all is a 502 (504 on timeout).

The API key is read from the environment variable the config names, when the provider is built;
it is sent as the provider's auth header only, and never appears in a log, error or repr.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx

from moestack.config.schema import OverflowProviderConfig
from moestack.engine.protocol import EngineChunk
from moestack.errors import MoestackError
from moestack.usage import NO_USAGE, Usage

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"

PATHS = {
    "openai": {"chat.completions": "/chat/completions", "completions": "/completions"},
    "anthropic": {"messages": "/messages"},
}
"""Per provider kind, the gateway endpoints (ledger names) it stands in for, and its path under
``base_url``. Every other endpoint (Responses, embeddings, tokenize, count_tokens, ...) never
overflows: it waits for a replica."""


class ProviderError(MoestackError):
    """The provider gave no usable answer (unreachable, timed out, refused our credentials)."""

    status_code = 502
    error_type = "server_error"
    code = "provider_unavailable"


class ProviderTimeoutError(ProviderError):
    status_code = 504
    code = "provider_timeout"


class Provider:
    """One external API, with its concurrency cap."""

    def __init__(self, config: OverflowProviderConfig, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.name = config.name
        self.backend = f"provider:{config.name}"
        self._api_key = api_key if api_key is not None else os.environ.get(config.api_key_env)
        if not self._api_key:
            log.warning("overflow provider %s: environment variable %s is not set; the "
                        "provider is disabled", config.name, config.api_key_env)
        self.inflight = 0
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"), transport=transport,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_concurrency))

    def __repr__(self) -> str:
        return f"Provider({self.name!r}, {self.config.kind}, {self.config.base_url})"

    def serves(self, endpoint: str) -> bool:
        """Whether this provider can stand in for the gateway endpoint named ``endpoint``."""
        return bool(self._api_key) and endpoint in PATHS[self.config.kind]

    def has_room(self) -> bool:
        return self.inflight < self.config.max_concurrency

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self, client_headers: dict[str, str]) -> dict[str, str]:
        if self.config.kind == "anthropic":
            return {"x-api-key": self._api_key or "", "content-type": "application/json",
                    "anthropic-version": client_headers.get("anthropic-version",
                                                            ANTHROPIC_VERSION),
                    **({"anthropic-beta": client_headers["anthropic-beta"]}
                       if "anthropic-beta" in client_headers else {})}
        return {"authorization": f"Bearer {self._api_key}", "content-type": "application/json"}

    async def serve(self, endpoint: str, raw: bytes, prompt_tokens_bound: int,
                    client_headers: dict[str, str] | None = None) -> AsyncIterator[EngineChunk]:
        """The provider's answer to the client's body ``raw`` for ``endpoint``, as engine chunks
        (contract of :mod:`moestack.engine.protocol`); closing it cancels the provider request."""
        body = json.loads(raw)
        body["model"] = self.config.model
        stream = bool(body.get("stream"))
        drop_usage = False
        if stream and self.config.kind == "openai":
            options = body.get("stream_options") or {}
            if not options.get("include_usage"):
                drop_usage = True
                body["stream_options"] = {**options, "include_usage": True}
        request = self._client.build_request(
            "POST", PATHS[self.config.kind][endpoint], headers=self._headers(client_headers or {}),
            content=json.dumps(body, ensure_ascii=False).encode())
        self.inflight += 1
        try:
            with self._errors("did not answer in time", "could not be reached"):
                response = await self._client.send(request, stream=True)
            try:
                with self._errors("stopped answering", "broke off its answer"):
                    async for chunk in self._answer(response, stream, drop_usage,
                                                    prompt_tokens_bound):
                        yield chunk
            finally:
                await response.aclose()
        finally:
            self.inflight -= 1

    @contextmanager
    def _errors(self, timed_out: str, failed: str) -> Iterator[None]:
        """httpx's timeouts and transport errors as the provider errors a client gets."""
        try:
            yield
        except httpx.TimeoutException:
            raise ProviderTimeoutError(f"The overflow provider `{self.name}` {timed_out}.") \
                from None
        except httpx.HTTPError:
            raise ProviderError(f"The overflow provider `{self.name}` {failed}.") from None

    async def _answer(self, response: httpx.Response, stream: bool, drop_usage: bool,
                      prompt_bound: int) -> AsyncIterator[EngineChunk]:
        content_type = response.headers.get("content-type", "application/json")
        status = response.status_code
        if status >= 400 or not (stream and content_type.startswith("text/event-stream")):
            data = await response.aread()
            if status in (401, 403):
                log.error("overflow provider %s refused the gateway's credentials (%d)",
                          self.name, status)
                raise ProviderError(f"The overflow provider `{self.name}` refused the "
                                    "gateway's credentials.")
            usage = whole_usage(self.config.kind, data) if status < 400 else NO_USAGE
            yield EngineChunk(data, usage, status, content_type)
            return
        meter = StreamMeter(self.config.kind, prompt_bound)
        pending = b""
        first = True
        async for piece in response.aiter_bytes():
            pending += piece
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            events, pending = pending[:cut + 2], pending[cut + 2:]
            out = meter.feed(events, drop_usage)  # yielded even if empty: its usage counts
            yield EngineChunk(out, meter.usage, status if first else None,
                              content_type if first else None)
            first = False
        if pending or first:
            yield EngineChunk(pending, meter.usage, status if first else None,
                              content_type if first else None)


class StreamMeter:
    """Reads the usage of a provider's SSE stream as it goes; drops OpenAI's usage-only chunk
    when asked."""

    def __init__(self, kind: str, prompt_bound: int):
        self.kind = kind
        self.prompt_bound = prompt_bound
        self.reported: Usage | None = None
        self.input: Usage | None = None
        self.content_events = 0

    @property
    def usage(self) -> Usage:
        if self.reported is not None:
            return self.reported
        if self.input is not None:  # Anthropic: input known, output counted so far
            return Usage(self.input.prompt_tokens, self.content_events,
                         self.input.cached_prompt_tokens)
        return Usage(self.prompt_bound if self.content_events else 0, self.content_events)

    def feed(self, events: bytes, drop_usage: bool) -> bytes:
        """Whole events in; the bytes to relay out."""
        kept = []
        for event in events.split(b"\n\n"):
            if not event.strip():
                continue
            payload = _data_of(event)
            if payload is not None and self._read(payload) and drop_usage:
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _read(self, payload: dict) -> bool:
        """Take usage from one event's JSON; True for an OpenAI usage-only chunk."""
        if self.kind == "openai":
            if payload.get("usage"):
                self.reported = openai_usage(payload["usage"])
            if payload.get("choices"):
                self.content_events += 1
                return False
            return bool(payload.get("usage"))
        kind = payload.get("type")
        if kind == "message_start":
            self.input = anthropic_usage((payload.get("message") or {}).get("usage") or {})
        elif kind == "content_block_delta":
            self.content_events += 1
        elif kind == "message_delta" and self.input is not None:
            out = int((payload.get("usage") or {}).get("output_tokens") or 0)
            self.reported = Usage(self.input.prompt_tokens, out,
                                  self.input.cached_prompt_tokens)
        return False


def _data_of(event: bytes) -> dict | None:
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines or lines == [b"[DONE]"]:
        return None
    try:
        payload = json.loads(b"\n".join(lines))
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def openai_usage(u: dict) -> Usage:
    details = u.get("prompt_tokens_details") or {}
    return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0),
                 int(details.get("cached_tokens") or 0))


def anthropic_usage(u: dict) -> Usage:
    """Anthropic counts cache reads and writes apart from ``input_tokens``; here they are part
    of the prompt, cache reads as cached prompt tokens."""
    cached = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cached + int(
        u.get("cache_creation_input_tokens") or 0)
    return Usage(prompt, int(u.get("output_tokens") or 0), cached)


def whole_usage(kind: str, data: bytes) -> Usage:
    """The usage of a whole (non-streamed) answer; none if it has none."""
    try:
        u = json.loads(data).get("usage") or {}
    except (ValueError, AttributeError):
        return NO_USAGE
    return anthropic_usage(u) if kind == "anthropic" else openai_usage(u)
