"""Logic of POST /v1/chat/completions (no HTTP here)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from moestack.api.chat.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
)
from moestack.api.generation import GenerationService
from moestack.api.streaming import sse_stream, usage_of
from moestack.engine.protocol import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
)

ENDPOINT = "chat.completions"


def sampling_of(body) -> SamplingOptions:
    max_tokens = body.effective_max_tokens() if hasattr(body, "effective_max_tokens") \
        else body.max_tokens
    return SamplingOptions(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                           seed=body.seed, stop=body.stop_list(),
                           presence_penalty=body.presence_penalty,
                           frequency_penalty=body.frequency_penalty)


class ChatServing:
    def __init__(self, service: GenerationService):
        self.service = service

    async def create(self, body: ChatCompletionRequest,
                     request_id: str | None = None) -> ChatCompletion | AsyncIterator[str]:
        rid = request_id or f"chatcmpl-{uuid.uuid4().hex}"
        request = GenerationRequest(
            request_id=rid, sampling=sampling_of(body),
            messages=tuple(ChatMessage(m.role, m.text()) for m in body.messages))
        created = int(time.time())
        if not body.stream:
            text, last = await self.service.complete(body.model, request, ENDPOINT)
            return ChatCompletion(
                id=rid, created=created, model=body.model, usage=usage_of(last),
                choices=[ChatChoice(message=ChatMessageOut(content=text),
                                    finish_reason=last.finish_reason)])
        chunks = await self.service.open_stream(body.model, request, ENDPOINT, stream=True)
        first = [True]

        def render(chunk: GenerationChunk) -> ChatCompletionChunk:
            delta = ChatDelta(role="assistant" if first[0] else None, content=chunk.text)
            first[0] = False
            return ChatCompletionChunk(
                id=rid, created=created, model=body.model,
                choices=[ChatChunkChoice(delta=delta, finish_reason=chunk.finish_reason)])

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        render_usage = (lambda usage: ChatCompletionChunk(
            id=rid, created=created, model=body.model, choices=[], usage=usage)) \
            if include_usage else None
        return sse_stream(chunks, render, render_usage)
