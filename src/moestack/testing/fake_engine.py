"""A fake engine that speaks the engine protocol (the OpenAI wire format) without a model.

It serves ``/v1/chat/completions``, ``/v1/completions`` and ``/tokenize`` as an OpenAI server
would: it "tokenizes" by whitespace (one token per word, chat messages rendered with role
markers), emits ``tok<N>`` words, honours ``max_tokens``, ``n``, list prompts, ``stop``, the
context length and ``stream_options.include_usage``, answers vLLM-shaped 400s, and can be told to
be slow or to fail, so gateways, routers and meters can be tested on a laptop. Usage rides on
every chunk as the engine protocol asks.

With ``fake.prefix_cache_tokens`` set it also simulates a prefix cache: prompts are cut into blocks
of ``fake.prefix_block_tokens`` token ids, whole blocks already seen (LRU) count as
``cached_prompt_tokens``, and only the rest pays ``fake.prefill_s_per_token``, one prefill at a
time per engine, so routing policies change both cache hits and time to first token. As in vLLM,
a request's ``cache_salt`` is part of its blocks' keys: requests share cached blocks only with
requests of the same salt (none counts as one salt of its own).

LoRA adapters, with the knobs vLLM reads (``engine_args``: ``enable_lora``, ``max_loras``,
``max_cpu_loras``): :meth:`FakeEngine.ensure_adapter` registers an adapter and loads it into an
LRU of ``max_cpu_loras`` (else ``max_loras``) adapters; a request naming a registered adapter
that was evicted loads it again, as vLLM does, and every load counts in ``adapter_loads`` and
takes ``fake.adapter_load_s`` (prefills of the replica wait meanwhile). An
adapter's answers are its own deterministic words, ``<adapter>.tok<N>``, and name it as the
model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.engine.protocol import (
    Engine,
    EngineChunk,
    EngineInfo,
    EngineRequest,
    EngineStats,
)
from moestack.errors import EngineUnavailableError, InvalidAdapterError
from moestack.testing.fake_scheduler import BatchScheduler
from moestack.usage import Usage

_COMMON_FIELDS = frozenset({
    "model", "max_tokens", "n", "stream", "stream_options", "stop", "temperature", "top_p",
    "seed", "presence_penalty", "frequency_penalty", "user", "ignore_eos", "priority",
    "request_id", "cache_salt"})
REQUEST_FIELDS = {
    "/v1/chat/completions": _COMMON_FIELDS | {"messages", "max_completion_tokens"},
    "/v1/completions": _COMMON_FIELDS | {"prompt"},
    "/tokenize": frozenset({"model", "prompt", "messages", "add_special_tokens"}),
}
"""The fields the fake reads, per route: anything else is refused by the gateway."""

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass
class FakeFault:
    """Make the next requests fail: after ``after_tokens`` tokens, with EngineUnavailableError."""

    after_tokens: int = 0
    message: str = "injected engine failure"


@dataclass(frozen=True)
class SeenRequest:
    """A request the fake accepted: its id, route and JSON body."""

    request_id: str
    path: str
    body: dict[str, Any]
    tenant: str | None = None

    @property
    def priority(self) -> int:
        return self.body.get("priority", 0)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class FakeEngine(Engine):
    """Deterministic stand-in for vLLM's OpenAI server; see the module docstring."""

    def __init__(self, config: ModelConfig, cache_dir: Path | None = None):
        self._config = config
        self._started = False
        self._in_flight = 0
        self.fault: FakeFault | None = None
        self.healthy = True
        self.requests_seen: list[SeenRequest] = []
        """The generation requests the engine accepted, in order."""
        self.aborted: list[str] = []
        self.prefix_cache = FakePrefixCache(config.fake.prefix_cache_tokens,
                                            config.fake.prefix_block_tokens)
        self._prefill_lock = asyncio.Lock()
        # Batch scheduler (fake.max_num_seqs): a running slot is held while tokens are produced.
        self.scheduler = (BatchScheduler(config.fake.max_num_seqs, config.fake.preempt)
                          if config.fake.max_num_seqs else None)
        args = config.lora_engine_args()  # `lora:`, overridden by engine_args
        self.adapter_capacity = ((args.get("max_cpu_loras") or args.get("max_loras") or 1)
                                 if args.get("enable_lora") else 0)
        self.adapter_paths: dict[str, str] = {}
        """Registered adapters: name -> path."""
        self._held_adapters: OrderedDict[str, None] = OrderedDict()
        self.adapter_loads = 0
        """Adapter loads so far (first loads and loads again after eviction)."""

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(model=self._config.name, max_model_len=self._config.max_model_len,
                          architecture="FakeMoE", request_fields=REQUEST_FIELDS,
                          priority_scheduling=True)

    async def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        self._started = False

    async def check_health(self) -> None:
        if not self._started or not self.healthy:
            raise EngineUnavailableError("fake engine is not running")

    def stats(self) -> EngineStats:
        return EngineStats(running_requests=self._in_flight,
                           kv_cache_usage_ratio=self.prefix_cache.usage_ratio,
                           adapters=frozenset(self._held_adapters))

    async def ensure_adapter(self, name: str, path: str) -> bool:
        if not self.adapter_capacity:
            raise InvalidAdapterError(f"model {self._config.name} serves no LoRA adapters: its "
                                      "engine_args need enable_lora: true", param="model")
        if name == self._config.name:
            raise InvalidAdapterError(f"adapter {name} conflicts with the base model",
                                      param="model")
        if self.adapter_paths.get(name) != path:  # new, or a new version: load it afresh
            self._held_adapters.pop(name, None)
            self.adapter_paths[name] = path
        elif name in self._held_adapters:
            self._held_adapters.move_to_end(name)
            return False
        return await self._load_adapter(name)

    async def remove_adapter(self, name: str) -> bool:
        self._held_adapters.pop(name, None)
        return self.adapter_paths.pop(name, None) is not None

    async def _load_adapter(self, name: str) -> bool:
        """Hold ``name`` as the most recently used adapter, evicting past the capacity; returns
        whether it had to be loaded. A load takes ``fake.adapter_load_s`` while the replica's
        prefills wait, and evicts when it happens (loads run one at a time, in order)."""
        if name in self._held_adapters:
            self._held_adapters.move_to_end(name)
            return False
        if self._config.fake.adapter_load_s:
            async with self._prefill_lock:
                if name in self._held_adapters:  # loaded while this one waited
                    self._held_adapters.move_to_end(name)
                    return False
                await asyncio.sleep(self._config.fake.adapter_load_s)
                self._hold(name)
            return True
        self._hold(name)
        return True

    def _hold(self, name: str) -> None:
        self._held_adapters[name] = None
        self.adapter_loads += 1
        while len(self._held_adapters) > self.adapter_capacity:
            self._held_adapters.popitem(last=False)

    # -- the wire format ----------------------------------------------------------------------

    async def serve(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        if not self._started or not self.healthy:
            raise EngineUnavailableError("fake engine is not running")
        try:
            body = json.loads(request.body)
            if request.path == "/tokenize":
                ids = self.tokenize(_prompts(body, "messages" in body)[0])
                yield _json(200, {"count": len(ids), "max_model_len": self._config.max_model_len,
                                  "tokens": ids})
                return
            chat = request.path == "/v1/chat/completions"
            if request.path not in REQUEST_FIELDS:
                yield _error(404, f"no route {request.path}", None)
                return
            prompts = [self.tokenize(p) for p in _prompts(body, chat)]
            salt = _salt(body)
            max_tokens = self._max_tokens(body, prompts)
            n = _int(body, "n", 1)
            stops = body.get("stop") or []
            stops = [stops] if isinstance(stops, str) else stops
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise _BadRequest("stop must be a string or a list of strings", "stop")
            if not isinstance(body.get("stream_options") or {}, dict):
                raise _BadRequest("stream_options must be an object", "stream_options")
        except _BadRequest as exc:
            yield _error(400, str(exc), exc.param)
            return
        except ValueError:
            yield _error(400, "The request body is not valid JSON.", None)
            return
        self.requests_seen.append(SeenRequest(request.request_id, request.path, body,
                                              request.tenant))
        if body.get("model") in self.adapter_paths:
            await self._load_adapter(body["model"])
        answer = self._generate(request, body, chat, prompts, max_tokens, n, stops, salt)
        try:
            async for chunk in answer:
                yield chunk
        finally:
            await answer.aclose()  # the consumer left: abort now, not when garbage collected

    def tokenize(self, text: str) -> list[int]:
        return [hash_word(w) for w in text.split()]

    def _max_tokens(self, body: dict, prompts: list[list[int]]) -> int:
        limit = self._config.max_model_len
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise _BadRequest("the prompt is empty", "prompt")
        if requested is None:
            requested = limit - longest
        if not isinstance(requested, int) or requested < 1:
            raise _BadRequest("max_tokens must be a positive integer", "max_tokens")
        if longest + requested > limit:
            raise _BadRequest(f"This model's maximum context length is {limit} tokens. However, "
                              f"you requested {longest + requested} tokens ({longest} in the "
                              f"prompt, {requested} for the completion).", "max_tokens")
        return requested

    async def _generate(self, request, body, chat, prompts, max_tokens, n, stops, salt):
        timing, fault = self._config.fake, self.fault
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        kind = "chat.completion" if chat else "text_completion"
        choices = [(p, c) for p in range(len(prompts)) for c in range(n)]
        texts = [""] * len(choices)
        finish: list[str | None] = [None] * len(choices)
        prompt_tokens, cached, completion = sum(map(len, prompts)), 0, 0
        adapter = body.get("model") if body.get("model") in self.adapter_paths else None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}",
                "object": kind + (".chunk" if stream and chat else ""),
                "created": int(time.time()), "model": adapter or self._config.name}
        done, first = False, True
        self._in_flight += 1
        # A batch slot (fake.max_num_seqs) is held while tokens are produced, as in vLLM.
        seq = (self.scheduler.add(request.request_id, body.get("priority", 0))
               if self.scheduler is not None else None)
        try:
            if seq is not None:
                await seq.run()
            for ids in prompts:
                cached += await self._prefill(ids, salt)
            if timing.ttft_s:
                await asyncio.sleep(timing.ttft_s)
            for step in range(1, max_tokens + 1):
                if fault is not None and step > fault.after_tokens:
                    raise EngineUnavailableError(fault.message)
                interval = (timing.token_interval_s
                            + timing.token_interval_per_running_request_s * self._in_flight)
                if step > 1 and interval:
                    await asyncio.sleep(interval)
                if seq is not None and await seq.run():  # preempted: prefill again
                    await asyncio.sleep(timing.ttft_s)
                deltas = []
                for i, _ in enumerate(choices):
                    if finish[i] is not None:
                        continue
                    word = f"{adapter}.tok{step} " if adapter else f"tok{step} "
                    completion += 1
                    texts[i] += word
                    if any(s and s in texts[i] for s in stops):
                        finish[i], word = "stop", ""
                    elif step == max_tokens:
                        finish[i] = "length"
                    deltas.append((i, word, finish[i]))
                done = all(f is not None for f in finish)
                usage = Usage(prompt_tokens, completion, cached)
                if stream:
                    events = [{**head, "choices": [_delta(chat, i, w, f, first)]}
                              for i, w, f in deltas]
                    if done and include_usage:
                        events.append({**head, "choices": [], "usage": _usage(usage)})
                    data = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
                    if done:
                        data += "data: [DONE]\n\n"
                    yield EngineChunk(data.encode(), usage, *((200, "text/event-stream")
                                                              if first else (None, None)))
                    first = False
                if done:
                    if stream and timing.end_of_body_delay_s:
                        await asyncio.sleep(timing.end_of_body_delay_s)
                        yield EngineChunk(b"", usage)
                    break
            if not stream:
                out = {**head, "choices": [_choice(chat, i, t, f) for i, (t, f)
                                           in enumerate(zip(texts, finish))],
                       "usage": _usage(usage)}
                yield EngineChunk(json.dumps(out).encode(), usage, 200, "application/json")
        finally:
            if seq is not None:
                seq.finish()
            self._in_flight -= 1
            if not done:
                self.aborted.append(request.request_id)

    async def _prefill(self, ids: list[int], salt: str | None = None) -> int:
        """Look the prompt up in the prefix cache, "compute" the rest; returns cached tokens."""
        keys = self.prefix_cache.keys(ids, salt)
        cached = self.prefix_cache.lookup(keys, len(ids))
        if self._config.fake.prefill_s_per_token:
            async with self._prefill_lock:
                await asyncio.sleep((len(ids) - cached) * self._config.fake.prefill_s_per_token)
        self.prefix_cache.insert(keys)
        return cached


def _int(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(f"{name} must be a positive integer", name)
    return value


def _salt(body: dict) -> str | None:
    """The body's ``cache_salt``, checked as vLLM checks it."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 128):
        raise _BadRequest("Parameter 'cache_salt' must be a non-empty string of at most 128 "
                          "characters if provided.", "cache_salt")
    return salt


def _prompts(body: dict, chat: bool) -> list[str]:
    """The prompt texts of a body: one per list prompt (chat: the rendered messages)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list", "messages")
        parts = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content", ""), str):
                raise _BadRequest("each message needs a role and a text content", "messages")
            if m.get("role") not in ROLES:
                raise _BadRequest(f"unknown message role {m.get('role')!r}", "messages")
            parts.append(f"<|{m.get('role')}|> {m.get('content') or ''} <|end|>")
        return [" ".join(parts) + " <|assistant|>"]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [" ".join(map(str, prompt))]
    raise _BadRequest("prompt must be a string, a list of strings or a list of token ids",
                      "prompt")


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def _delta(chat: bool, index: int, word: str, finish: str | None, first: bool) -> dict:
    if chat:
        delta = {"role": "assistant", "content": word} if first else {"content": word}
        return {"index": index, "delta": delta, "finish_reason": finish}
    return {"index": index, "text": word, "finish_reason": finish}


def _choice(chat: bool, index: int, text: str, finish: str | None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish}
    return {"index": index, "text": text, "finish_reason": finish}


def _json(status: int, body: dict) -> EngineChunk:
    return EngineChunk(json.dumps(body).encode(), Usage(), status, "application/json")


def _error(status: int, message: str, param: str | None) -> EngineChunk:
    """An error answer shaped as vLLM's server shapes it."""
    return _json(status, {"error": {"message": message, "type": "BadRequestError",
                                    "param": param, "code": status}})


class FakePrefixCache:
    """Whole blocks of token ids keyed by their chained prefix, evicted least recently used."""

    def __init__(self, capacity_tokens: int, block_tokens: int):
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._blocks: OrderedDict[tuple, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def usage_ratio(self) -> float:
        return len(self._blocks) / self.capacity_blocks if self.capacity_blocks else 0.0

    def keys(self, ids: Sequence[int], salt: str | None = None) -> list[tuple]:
        """The cache keys of a prompt's whole blocks (each key is the salt and the prefix up
        to the block, as vLLM hashes the salt into the first block and chains the rest)."""
        # Like vLLM: only whole blocks, and the last prompt token is always computed.
        n = (len(ids) - 1) // self.block_tokens if self.capacity_blocks else 0
        return [(salt, *ids[:(i + 1) * self.block_tokens]) for i in range(n)]

    def lookup(self, keys: Sequence[tuple], prompt_tokens: int) -> int:
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

    def insert(self, keys: Sequence[tuple]) -> None:
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
