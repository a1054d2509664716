"""Request migration: a stream whose replica dies mid-answer goes on on another replica.

The replica marks the streams it can resume (:mod:`moestack.engine.resume`): their first chunk
names the prompt's token ids and every chunk the ids of the tokens it carries. When such a
stream fails after its first chunk (:class:`EngineUnavailableError`: the replica died or its
engine failed; :class:`ReplicaDrainingError`: the backend ended it on a replica that has been
draining for ``gateway.migration.drain_after_s``, so that a scale-down or rolling update does
not wait for it), :class:`Migrator` sends the prompt's ids plus the ids the client
already has as the prompt of a ``/v1/completions`` stream, with the remaining completion budget
and the request's own sampling fields (seed included), and re-shapes that stream's events into
the original endpoint's events: same ``id``, ``created``, ``model``, choice index and fields, so
the client reads one answer with nothing missing or repeated. A replica that stops answering
(nothing for ``gateway.migration.stall_timeout_s`` after the first chunk) counts as failed.
The engine's incremental detokenizer starts from the prompt, so a character whose first bytes
the client has not been sent yet (held back as incomplete) comes whole in the first resumed
event.

Bounds: at most ``gateway.migration.max_attempts`` resumptions per request, each of which must
give its first chunk within ``gateway.first_token_timeout_s``; past that the stream fails as
before (the relay's error event).

Billing: the chunks' :class:`~moestack.usage.Usage` stays the tenant's: its prompt once, each
completion token once (those sent before the failure plus those of the resumed stream). The
resumed prompt (re-prefill) is the operator's overhead, reported through ``on_migrated``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from moestack.api.backend import ModelBackend
from moestack.config.schema import MoestackConfig
from moestack.engine.protocol import EngineChunk, EngineRequest
from moestack.engine.resume import CHAT, COMPLETIONS, RESUMABLE_ROUTES
from moestack.errors import EngineUnavailableError, ReplicaDrainingError
from moestack.usage import NO_USAGE, Usage

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "length_penalty", "logit_bias",
                   "ignore_eos", "stop_token_ids", "skip_special_tokens",
                   "spaces_between_special_tokens", "bad_words", "allowed_token_ids",
                   "priority", "cache_salt", "user", "vllm_xargs")
"""Fields of the original request that the resumed ``/v1/completions`` request keeps."""

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""vLLM's default ``max_tokens`` of ``/v1/completions`` (OpenAI's too)."""

OnMigrated = Callable[[str, int, str], None]
"""Called with (model, re-prefilled prompt tokens, reason) for each resumption; reason is
``failure`` (the replica failed) or ``drain`` (it was draining)."""


@dataclass
class _Progress:
    """What the client has of one resumable stream."""

    prompt_ids: tuple[int, ...]
    generated: list[int] = field(default_factory=list)
    usage: Usage = NO_USAGE
    """The tenant's usage so far."""
    first_data: bytes = b""
    last_data: bytes = b""
    template: dict[str, Any] | None = None
    """An event of the original stream, the shape resumed events take."""
    base: int = 0
    """Tokens the client had when the running resumption started."""


class Migrator:
    """Serves requests through ``backend``, resuming resumable streams that fail mid-way."""

    def __init__(self, config: MoestackConfig, backend: ModelBackend,
                 on_migrated: OnMigrated | None = None):
        self.backend = backend
        self.max_attempts = config.gateway.migration.max_attempts
        self.timeout_s = config.gateway.first_token_timeout_s
        self.drain_after_s = config.gateway.migration.drain_after_s
        self.stall_timeout_s = config.gateway.migration.stall_timeout_s
        self.on_migrated = on_migrated
        self.migrated: Counter[str] = Counter()
        """Per model: resumptions that gave output."""
        self.resume_delays_s: deque[float] = deque(maxlen=10_000)
        """Seconds from each failure to the resumed stream's first chunk (latest first out)."""

    async def serve(self, model: str, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """``backend.serve`` with mid-stream resumption (engine protocol contract)."""
        if self.max_attempts == 0 or request.path not in RESUMABLE_ROUTES:
            stream = self.backend.serve(model, request)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()
            return
        progress: _Progress | None = None
        attempts = 0
        body: dict[str, Any] | None = None
        stream = self.backend.serve(model, replace(request, drain_after_s=self.drain_after_s))
        try:
            while True:
                try:
                    async for chunk in _watched(stream, self.stall_timeout_s, attempts > 0):
                        if progress is None:
                            if chunk.prompt_token_ids is None or chunk.status != 200:
                                yield chunk  # not resumable: relayed as it is
                                async for rest in stream:
                                    yield rest
                                return
                            progress = _Progress(chunk.prompt_token_ids, usage=chunk.usage,
                                                 first_data=chunk.data)
                        if attempts == 0:
                            progress.generated.extend(chunk.token_ids)
                            progress.usage = chunk.usage
                            if chunk.data:
                                progress.last_data = chunk.data
                            yield chunk
                        else:
                            yield self._reshaped(chunk, progress, body)
                    return
                except EngineUnavailableError as exc:
                    if progress is None or attempts >= self.max_attempts:
                        raise
                    failed_at = time.monotonic()
                    await stream.aclose()
                    if body is None:
                        body = json.loads(request.body)
                        progress.template = _template(progress)
                    if _finished(progress.last_data):
                        for piece in _closing(progress, body):
                            yield piece
                        return
                    stream = None
                    while stream is None:
                        attempts += 1
                        log.warning("request %s: replica failed after %d tokens (%s); resuming "
                                    "on another replica (%d of %d)", request.request_id,
                                    len(progress.generated), exc.message, attempts,
                                    self.max_attempts)
                        resume = _resume_request(request, body, progress, attempts)
                        if attempts < self.max_attempts:  # it may move once more
                            resume = replace(resume, drain_after_s=self.drain_after_s)
                        candidate = self.backend.serve(model, resume)
                        try:
                            first = await asyncio.wait_for(anext(candidate), self.timeout_s)
                        except (EngineUnavailableError, asyncio.TimeoutError,
                                StopAsyncIteration) as again:
                            await candidate.aclose()
                            if attempts >= self.max_attempts:
                                raise exc from again
                            continue
                        if first.status != 200:  # the engine refused the resumed request
                            await candidate.aclose()
                            log.error("request %s: resumed request refused (%d): %s",
                                      request.request_id, first.status, first.data[:300])
                            raise exc
                        stream = candidate
                    self.migrated[model] += 1
                    self.resume_delays_s.append(time.monotonic() - failed_at)
                    if self.on_migrated is not None:
                        reason = "drain" if isinstance(exc, ReplicaDrainingError) else "failure"
                        self.on_migrated(model, len(progress.prompt_ids)
                                         + len(progress.generated), reason)
                    progress.base = len(progress.generated)
                    yield self._reshaped(first, progress, body)
        finally:
            if stream is not None:
                await stream.aclose()

    def _reshaped(self, chunk: EngineChunk, progress: _Progress, body: dict[str, Any]
                  ) -> EngineChunk:
        """A chunk of a resumed ``/v1/completions`` stream, as the original endpoint's."""
        progress.generated.extend(chunk.token_ids)
        # The tenant's usage: its own prompt, every completion token once.
        completion = progress.base + chunk.usage.completion_tokens
        progress.usage = Usage(progress.usage.prompt_tokens, completion,
                               progress.usage.cached_prompt_tokens)
        out: list[bytes] = []
        for event in chunk.data.split(b"\n\n"):
            event = event.strip()
            if not event.startswith(b"data:"):
                continue
            payload = event[5:].strip()
            if payload == b"[DONE]":
                out.append(b"data: [DONE]\n\n")
                continue
            data = json.loads(payload)
            if "error" in data:
                raise EngineUnavailableError("the resumed request failed")
            choices = data.get("choices") or []
            if choices:
                c = choices[0]
                out.append(_event(_text_event(progress, body, c.get("text", ""),
                                              c.get("finish_reason"), c.get("stop_reason"),
                                              c.get("token_ids"))))
            elif data.get("usage") is not None and _include_usage(body):
                out.append(_event(_usage_event(progress, data["usage"])))
        data = b"".join(out)
        if data:  # what the client has last, in the original shape (see _finished)
            progress.last_data = data
        return replace(chunk, data=data, usage=progress.usage, token_ids=(),
                       prompt_token_ids=None)


async def _watched(stream: AsyncIterator[EngineChunk], stall_timeout_s: float | None,
                   watch_first: bool) -> AsyncIterator[EngineChunk]:
    """``stream``'s chunks; :class:`EngineUnavailableError` when the next one takes longer than
    ``stall_timeout_s`` (the replica stopped answering). The first chunk is watched only if
    ``watch_first`` (the first-token timeout bounds it otherwise). No timer runs while a chunk
    is with the caller."""
    if stall_timeout_s is None:
        async for chunk in stream:
            yield chunk
        return
    watch = watch_first
    while True:
        try:
            if watch:
                async with asyncio.timeout(stall_timeout_s):
                    chunk = await anext(stream)
            else:
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise EngineUnavailableError(f"the model replica sent nothing for "
                                         f"{stall_timeout_s:g} s") from None
        watch = True
        yield chunk


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False
                                  ).encode() + b"\n\n"


def _events(data: bytes) -> list[dict[str, Any]]:
    out = []
    for event in data.split(b"\n\n"):
        event = event.strip()
        if event.startswith(b"data:") and event[5:].strip() != b"[DONE]":
            try:
                out.append(json.loads(event[5:]))
            except ValueError:
                continue
    return out


def _template(progress: _Progress) -> dict[str, Any]:
    """The last event with a choice the client got (the role event at worst)."""
    for data in (progress.last_data, progress.first_data):
        for ev in reversed(_events(data)):
            if ev.get("choices"):
                return ev
    raise EngineUnavailableError("the stream gave no event to resume from")


def _finished(last: bytes) -> bool:
    """Whether the client already has the answer's last choice event (or its end)."""
    if b"[DONE]" in last:
        return True
    for ev in _events(last):
        choices = ev.get("choices")
        if choices == [] and ev.get("usage") is not None:
            return True
        if choices and choices[0].get("finish_reason") is not None:
            return True
    return False


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    return bool(options.get("include_usage"))


def _text_event(progress: _Progress, body: dict[str, Any], text: str, finish: str | None,
                stop_reason: Any, token_ids: list[int] | None) -> dict[str, Any]:
    template = progress.template or {}
    event = {k: v for k, v in template.items() if k not in ("prompt_token_ids", "usage")}
    choice = dict(template["choices"][0])
    if "delta" in choice:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    choice["finish_reason"] = finish
    if finish is not None or "stop_reason" in choice:
        choice["stop_reason"] = stop_reason
    if "prompt_token_ids" in choice:
        choice["prompt_token_ids"] = None
    if "token_ids" in choice or body.get("return_token_ids") is True:
        choice["token_ids"] = token_ids if body.get("return_token_ids") is True else None
    event["choices"] = [choice]
    return event


def _usage_event(progress: _Progress, engine_usage: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The usage event of the original stream: the tenant's figures, in the shape of the
    engine's usage (``engine_usage``, the resumed stream's) where there is one."""
    template = progress.template or {}
    u = progress.usage
    event = {k: v for k, v in template.items()
             if k in ("id", "object", "created", "model", "system_fingerprint")}
    event["choices"] = []
    usage = dict(engine_usage or {})
    usage.update(prompt_tokens=u.prompt_tokens, total_tokens=u.prompt_tokens + u.completion_tokens,
                 completion_tokens=u.completion_tokens)
    if isinstance(usage.get("prompt_tokens_details"), dict):
        usage["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    event["usage"] = usage
    return event


def _closing(progress: _Progress, body: dict[str, Any]) -> list[EngineChunk]:
    """The end of a stream whose last choice event the client has: usage (if asked), done."""
    parts = []
    if b"[DONE]" in progress.last_data:
        return []
    if _include_usage(body) and not any(ev.get("choices") == [] for ev in
                                        _events(progress.last_data)):
        parts.append(_event(_usage_event(progress)))
    parts.append(b"data: [DONE]\n\n")
    return [EngineChunk(b"".join(parts), progress.usage)]


def _resume_request(request: EngineRequest, body: dict[str, Any], progress: _Progress,
                    attempt: int) -> EngineRequest:
    """The ``/v1/completions`` request that continues ``request`` from the tokens sent."""
    sent = len(progress.generated)
    resume: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    resume.update(model=body["model"], prompt=[*progress.prompt_ids, *progress.generated],
                  stream=True, return_token_ids=True, stream_options={"include_usage": True})
    if request.path == CHAT:
        budget = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        budget = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    if budget is not None:
        resume["max_tokens"] = max(1, budget - sent)
    if body.get("min_tokens"):
        resume["min_tokens"] = max(0, body["min_tokens"] - sent)
    return replace(request, request_id=f"{request.request_id}-resume{attempt}",
                   path=COMPLETIONS, body=json.dumps(resume).encode(),
                   resume_prompt_tokens=len(progress.prompt_ids))
