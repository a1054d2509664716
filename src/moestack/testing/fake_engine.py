"""A fake engine that honours the engine protocol without a model, for tests of upper layers.

It "tokenizes" by whitespace (one token per word, chat messages rendered with role markers), emits
``tok<N>`` words, obeys ``max_tokens``, the context length and ``stop``, and can be told to be slow
or to fail, so gateways, routers and meters can be tested on a laptop.

With ``fake.prefix_cache_tokens`` set it also simulates a prefix cache: prompts are cut into blocks
of ``fake.prefix_block_tokens`` token ids, whole blocks already seen (LRU) count as
``cached_prompt_tokens``, and only the rest pays ``fake.prefill_s_per_token``, one prefill at a
time per engine, so routing policies change both cache hits and time to first token.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
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
from moestack.testing.fake_scheduler import BatchScheduler


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
        self.prefix_cache = FakePrefixCache(config.fake.prefix_cache_tokens,
                                            config.fake.prefix_block_tokens)
        self._prefill_lock = asyncio.Lock()
        # Batch scheduler (fake.max_num_seqs): a running slot is held while tokens are produced.
        self.scheduler = (BatchScheduler(config.fake.max_num_seqs, config.fake.preempt)
                          if config.fake.max_num_seqs else None)

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
        seq = (self.scheduler.add(request.request_id, request.priority)
               if self.scheduler is not None else None)
        try:
            if seq is not None:
                await seq.run()
            cached = await self._prefill(ids)
            if timing.ttft_s:
                await asyncio.sleep(timing.ttft_s)
            text_so_far = ""
            for n in range(1, max_tokens + 1):
                if fault is not None and n > fault.after_tokens:
                    raise EngineUnavailableError(fault.message)
                interval = (timing.token_interval_s
                            + timing.token_interval_per_running_request_s * self._in_flight)
                if n > 1 and interval:
                    await asyncio.sleep(interval)
                if seq is not None and await seq.run():  # preempted: prefill again
                    await asyncio.sleep(timing.ttft_s)
                word = f"tok{n} "
                text_so_far += word
                stop_hit = any(s and s in text_so_far for s in request.sampling.stop)
                done = stop_hit or n == max_tokens
                yield GenerationChunk(
                    text="" if stop_hit else word, token_ids=(1000 + n,), prompt_tokens=len(ids),
                    completion_tokens=n, cached_prompt_tokens=cached,
                    finish_reason=("stop" if stop_hit else "length") if done else None)
                if done:
                    return
        finally:
            if seq is not None:
                seq.finish()
            self._in_flight -= 1
            if not done:
                self.aborted.append(request.request_id)

    async def check_health(self) -> None:
        if not self._started or not self.healthy:
            raise EngineUnavailableError("fake engine is not running")

    def stats(self) -> EngineStats:
        return EngineStats(running_requests=self._in_flight,
                           kv_cache_usage_ratio=self.prefix_cache.usage_ratio)

    async def _prefill(self, ids: list[int]) -> int:
        """Look the prompt up in the prefix cache, "compute" the rest; returns cached tokens."""
        keys = self.prefix_cache.keys(ids)
        cached = self.prefix_cache.lookup(keys, len(ids))
        if self._config.fake.prefill_s_per_token:
            async with self._prefill_lock:
                await asyncio.sleep((len(ids) - cached) * self._config.fake.prefill_s_per_token)
        self.prefix_cache.insert(keys)
        return cached


class FakePrefixCache:
    """Whole blocks of token ids keyed by their chained prefix, evicted least recently used."""

    def __init__(self, capacity_tokens: int, block_tokens: int):
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._blocks: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def usage_ratio(self) -> float:
        return len(self._blocks) / self.capacity_blocks if self.capacity_blocks else 0.0

    def keys(self, ids: Sequence[int]) -> list[tuple[int, ...]]:
        """The cache keys of a prompt's whole blocks (each key is the prefix up to it)."""
        # Like vLLM: only whole blocks, and the last prompt token is always computed.
        n = (len(ids) - 1) // self.block_tokens if self.capacity_blocks else 0
        return [tuple(ids[:(i + 1) * self.block_tokens]) for i in range(n)]

    def lookup(self, keys: Sequence[tuple[int, ...]], prompt_tokens: int) -> int:
        """Cached tokens of a prompt of ``prompt_tokens`` tokens whose block keys are ``keys``."""
        hits = 0
        for key in keys:
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            hits += 1
        self.queried_tokens += prompt_tokens
        self.hit_tokens += hits * self.block_tokens
        return hits * self.block_tokens

    def insert(self, keys: Sequence[tuple[int, ...]]) -> None:
        for key in keys:
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)


def hash_word(word: str) -> int:
    """A stable token id for a word (Python's ``hash`` is salted per process)."""
    h = 2166136261
    for b in word.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % 50000
