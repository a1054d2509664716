"""Server-sent events for streamed responses: chunks, the optional usage chunk, errors, [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from moestack.api.errors import sse_error_event
from moestack.api.protocol import PromptTokensDetails, Usage
from moestack.engine.protocol import GenerationChunk
from moestack.errors import MoestackError


def usage_of(chunk: GenerationChunk) -> Usage:
    return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                 total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=chunk.cached_prompt_tokens))


def _data(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def sse_stream(chunks: AsyncIterator[GenerationChunk],
                     render: Callable[[GenerationChunk], BaseModel | None],
                     render_usage: Callable[[Usage], BaseModel] | None) -> AsyncIterator[str]:
    """Turn engine chunks into SSE lines; a failure mid-stream becomes an error event."""
    last = None
    try:
        async for chunk in chunks:
            last = chunk
            if (event := render(chunk)) is not None:
                yield _data(event)
    except MoestackError as exc:
        yield sse_error_event(exc)
        return
    if render_usage is not None and last is not None:
        yield _data(render_usage(usage_of(last)))
    yield "data: [DONE]\n\n"
