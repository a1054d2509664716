"""A fake engine that honours the engine protocol without a model, for tests of upper layers.

It "tokenizes" by whitespace (one token per word, chat messages rendered with role markers), emits
``tok<N>`` words, obeys ``max_tokens``, the context length and ``stop``, and can be told to be slow
or to fail, so gateways, routers and meters can be tested on a laptop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from moestack.config.schema import ModelConfig
from moestack.engine.protocol import (
    Engine,
    EngineInfo,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    check_fits_context,
)
from moestack.errors import EngineUnavailableError, InvalidRequestError



@dataclass
class FakeFault:
    """Make the next requests fail: after ``after_tokens`` tokens, with EngineUnavailableError."""

    after_tokens: int = 0
    message: str = "injected engine failure"


class FakeEngine(Engine):
    """Deterministic stand-in for vLLM; see the module docstring."""

    def __init__(self, config: ModelConfig, cache_dir: Path | None = None):
        self._config = config
        self._started = False
        self._in_flight = 0
        self.fault: FakeFault | None = None
        self.healthy = True
        self.requests_seen: list[GenerationRequest] = []
        self.aborted: list[str] = []

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(model=self._config.name, max_model_len=self._config.max_model_len,
                          architecture="FakeMoE")

    async def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        self._started = False

    async def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None:
            text = " ".join(f"<|{m.role}|> {m.content} <|end|>" for m in request.messages)
            text += " <|assistant|>"
        else:
            text = request.prompt or ""
        return [hash_word(w) for w in text.split()]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._started or not self.healthy:
            raise EngineUnavailableError("fake engine is not running")
        ids = await self.prompt_token_ids(request)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        max_tokens = check_fits_context(len(ids), request.sampling.max_tokens,
                                        self._config.max_model_len,
                                        request.prompt_param)
        self.requests_seen.append(request)
        timing, fault = self._config.fake, self.fault
        done = False
        self._in_flight += 1
        try:
            if timing.ttft_s:
                await asyncio.sleep(timing.ttft_s)
            text_so_far = ""
            for n in range(1, max_tokens + 1):
                if fault is not None and n > fault.after_tokens:
                    raise EngineUnavailableError(fault.message)
                if n > 1 and timing.token_interval_s:
                    await asyncio.sleep(timing.token_interval_s)
                word = f"tok{n} "
                text_so_far += word
                stop_hit = any(s and s in text_so_far for s in request.sampling.stop)
                done = stop_hit or n == max_tokens
                yield GenerationChunk(
                    text="" if stop_hit else word, token_ids=(1000 + n,), prompt_tokens=len(ids),
                    completion_tokens=n,
                    finish_reason=("stop" if stop_hit else "length") if done else None)
                if done:
                    return
        finally:
            self._in_flight -= 1
            if not done:
                self.aborted.append(request.request_id)

    async def check_health(self) -> None:
        if not self._started or not self.healthy:
            raise EngineUnavailableError("fake engine is not running")

    def stats(self) -> EngineStats:
        return EngineStats(running_requests=self._in_flight)


def hash_word(word: str) -> int:
    """A stable token id for a word (Python's ``hash`` is salted per process)."""
    h = 2166136261
    for b in word.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % 50000
