"""The engine protocol: the one seam between the serving layers and an inference engine.

Everything above the engine (gateway, routing, tenancy, metering) talks to this protocol only, so
the in-package fake engine (:mod:`moestack.testing`) can stand in for vLLM on any laptop.

Contract of :meth:`Engine.generate`:

* Before yielding anything it validates the request: a prompt that does not fit the context
  (prompt tokens + ``max_tokens`` > ``max_model_len``) raises :class:`PromptTooLongError`; other bad
  input raises :class:`InvalidRequestError`. Nothing has been generated (or is billable) then.
* It then yields one or more :class:`GenerationChunk`. Each chunk carries the *delta* text and token
  ids since the previous chunk, and the *cumulative* usage so far. ``prompt_tokens`` is the same in
  every chunk. Exactly the last chunk has ``finish_reason`` set (``"stop"`` or ``"length"``).
* If the engine fails after the request was accepted it raises :class:`EngineUnavailableError`.
* If the consumer stops iterating (client gone), closing the generator aborts the request in the
  engine; no tokens are produced for it afterwards.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling parameters in OpenAI terms; ``max_tokens=None`` means "up to the context"."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One generation; exactly one of ``prompt``, ``prompt_token_ids`` or ``messages`` is set."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    priority: int = 0
    """Lower runs first, as in vLLM's priority scheduler; 0 is the default tier."""
    tenant: str | None = None
    """Tenant the request runs for (set by the gateway), for tenant-aware replica routing."""

    @property
    def prompt_param(self) -> str:
        """The OpenAI request field the prompt came from, for error messages."""
        return "messages" if self.messages is not None else "prompt"

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise ValueError("set exactly one of prompt, prompt_token_ids or messages")


@dataclass(frozen=True)
class GenerationChunk:
    """Delta output plus cumulative usage; see the module docstring for the contract."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineInfo:
    model: str
    max_model_len: int
    architecture: str


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for routing, autoscaling and metrics."""

    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage_ratio: float = 0.0


class Engine(abc.ABC):
    """An inference engine serving one model; see the module docstring for the contract."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns once requests can be served."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Release the model and any processes it started (synchronous: runs from finalizers)."""

    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """What the engine serves; valid after :meth:`start`."""

    @abc.abstractmethod
    async def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids the engine would feed for ``request`` (chat template applied)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the output of ``request``."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineUnavailableError` if the engine cannot serve."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load."""


def check_fits_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                       prompt_param: str = "prompt") -> int:
    """Return the effective ``max_tokens``, or raise :class:`PromptTooLongError`.

    Shared by every engine so that all of them reject the same requests with the same message.
    """
    from moestack.errors import PromptTooLongError

    if prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_tokens} tokens, leaving no room for a completion. Please "
            "shorten the prompt.", param=prompt_param)
    if max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens")
    return max_tokens
