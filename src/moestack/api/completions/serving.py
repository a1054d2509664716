"""Logic of POST /v1/completions (no HTTP here)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from moestack.api.chat.serving import sampling_of
from moestack.api.completions.protocol import Completion, CompletionChoice, CompletionRequest
from moestack.api.generation import GenerationService
from moestack.api.streaming import sse_stream, usage_of
from moestack.engine.protocol import GenerationChunk, GenerationRequest
from moestack.errors import InvalidRequestError

ENDPOINT = "completions"


def _prompt_fields(body: CompletionRequest) -> dict:
    prompt = body.prompt
    if body.echo:
        raise InvalidRequestError("`echo` is not supported.", param="echo")
    if body.logprobs is not None:
        raise InvalidRequestError("`logprobs` is not supported.", param="logprobs")
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not prompt:
        raise InvalidRequestError("`prompt` must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return {"prompt_token_ids": tuple(prompt)}
    if len(prompt) > 1:
        raise InvalidRequestError("Batched prompts are not supported; send one prompt per "
                                  "request.", param="prompt")
    return {"prompt": prompt[0]}


class CompletionServing:
    def __init__(self, service: GenerationService):
        self.service = service

    async def create(self, body: CompletionRequest,
                     request_id: str | None = None) -> Completion | AsyncIterator[str]:
        rid = request_id or f"cmpl-{uuid.uuid4().hex}"
        request = GenerationRequest(request_id=rid, sampling=sampling_of(body),
                                    **_prompt_fields(body))
        created = int(time.time())
        if not body.stream:
            text, last = await self.service.complete(body.model, request, ENDPOINT)
            return Completion(id=rid, created=created, model=body.model, usage=usage_of(last),
                              choices=[CompletionChoice(text=text,
                                                        finish_reason=last.finish_reason)])
        chunks = await self.service.open_stream(body.model, request, ENDPOINT, stream=True)

        def render(chunk: GenerationChunk) -> Completion:
            return Completion(id=rid, created=created, model=body.model, choices=[
                CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason)])

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        render_usage = (lambda usage: Completion(id=rid, created=created, model=body.model,
                                                 choices=[], usage=usage)) \
            if include_usage else None
        return sse_stream(chunks, render, render_usage)
