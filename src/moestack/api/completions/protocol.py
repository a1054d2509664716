"""Protocol models of POST /v1/completions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moestack.api.protocol import OpenAIBaseModel, SamplingFields, Usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="Text, a one-element list of text, "
                                                "or token ids.")
    echo: bool = Field(False, description="Not supported; must be false.")
    logprobs: int | None = Field(None, description="Not supported; must be unset.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (default 16).")


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
