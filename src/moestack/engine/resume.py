"""Streams that can be resumed on another replica: the replica's half of request migration.

A streamed chat or completions request that :func:`resumable` accepts runs with vLLM's own
``return_token_ids``: every event then carries the ids of the tokens it holds (chat sends an
event per token even when the detokenizer holds back an incomplete character), and the first
event carries the prompt's ids (chat: after the chat template). :func:`annotate` moves those ids
out of the bytes into :attr:`EngineChunk.token_ids` and :attr:`EngineChunk.prompt_token_ids`,
putting back the ``null`` the client's own request would have shown, so the client sees the
answer it asked for and the gateway knows, chunk by chunk, which tokens the client has.
When the replica dies, the gateway (:mod:`moestack.api.migration`) sends those ids as the
prompt of a ``/v1/completions`` request to another replica.

What cannot be resumed exactly is left alone (no ids: the gateway ends such a stream with
today's error event): more than one choice (``n``, ``best_of``), logprobs, echo, stop strings
(the engine holds back text that may start one, so the client's text lags the tokens), tools,
structured output, a reasoning parser (it re-reads the whole answer), list prompts, suffix,
continuous usage stats.

On the replica that resumes a stream, vLLM's detokenizer starts from the resumed prompt, and
where that prompt ends inside an incomplete character ``tokenizers``' ``DecodeStream`` gives
back text the client already has. :class:`Replay` therefore re-detokenizes the resumed stream's
tokens the way the original stream's detokenizer would have (primed with the original prompt,
then fed the tokens the client has), so the text of each resumed event is exactly the text the
unbroken stream would have sent.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from moestack.engine.protocol import EngineChunk, EngineRequest

INVALID_PREFIX = "Invalid prefix encountered"
"""The ``DecodeStream`` error vLLM recovers from by restarting the stream (vLLM issue 17448)."""

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
RESUMABLE_ROUTES = frozenset({CHAT, COMPLETIONS})

_IDS = re.compile(rb'"(prompt_token_ids|token_ids)":\[([0-9,]*)\]')
"""The id lists vLLM writes (``model_dump_json``): a quote inside a JSON string is escaped, so
this cannot match generated text."""

_EXACT_ONLY = ("tools", "functions", "response_format", "structured_outputs", "guided_json",
               "guided_regex", "guided_choice", "guided_grammar", "prompt_logprobs", "suffix",
               "top_logprobs")


def resumable(path: str, body: dict[str, Any], *, reasoning_parser: bool = False) -> bool:
    """Whether a request can continue on another replica from the tokens already sent."""
    if path not in RESUMABLE_ROUTES or body.get("stream") is not True:
        return False
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return False
    if body.get("logprobs") not in (None, False) or body.get("echo"):
        return False
    if body.get("stop") or any(body.get(k) not in (None, [], {}) for k in _EXACT_ONLY):
        return False
    if body.get("response_format") not in (None, {"type": "text"}):
        return False
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or options.get("continuous_usage_stats"):
        return False
    if path == CHAT:
        return not reasoning_parser
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(isinstance(t, int) for t in prompt))


def with_token_ids(request: EngineRequest, *, reasoning_parser: bool = False
                   ) -> tuple[EngineRequest, bool, bool]:
    """``request`` asking the engine for token ids when it is resumable: returns the request
    to run, whether it is resumable, and whether the client asked for the ids itself."""
    if request.path not in RESUMABLE_ROUTES or b'"stream"' not in request.body:
        return request, False, False
    try:
        body = json.loads(request.body)
    except ValueError:
        return request, False, False
    if not isinstance(body, dict) or not resumable(request.path, body,
                                                     reasoning_parser=reasoning_parser):
        return request, False, False
    if body.get("return_token_ids") is True:
        return request, True, True
    body["return_token_ids"] = True
    return dataclasses.replace(request, body=json.dumps(body).encode()), True, False


def _ids(raw: bytes) -> tuple[int, ...]:
    return tuple(int(t) for t in raw.split(b",")) if raw else ()


async def annotate(chunks: AsyncIterator[EngineChunk], keep_ids: bool
                   ) -> AsyncIterator[EngineChunk]:
    """The chunks of a resumable stream with their token ids moved into the chunk's fields
    (and left in the bytes too when ``keep_ids``: the client asked for them)."""
    first = True
    async for chunk in chunks:
        if first and chunk.status != 200:  # the engine's own error answer: nothing to resume
            yield chunk
            async for rest in chunks:
                yield rest
            return
        prompt: list[int] = []
        tokens: list[int] = []

        def take(m: re.Match) -> bytes:
            (prompt if m.group(1) == b"prompt_token_ids" else tokens).extend(_ids(m.group(2)))
            return m.group(0) if keep_ids else b'"' + m.group(1) + b'":null'

        data = _IDS.sub(take, chunk.data)
        yield dataclasses.replace(chunk, data=data, token_ids=tuple(tokens),
                                  prompt_token_ids=tuple(prompt) if first else None)
        first = False


class Replay:
    """The text a stream's detokenizer gives for its next tokens, continued from the tokens the
    client has (``prompt_ids`` then ``sent_ids``), as vLLM's fast incremental detokenizer
    does it (``DecodeStream`` primed with the prompt)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], sent_ids: list[int],
                 skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self._new = lambda ids=None: DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens)
        self.tokenizer = tokenizer
        self.stream = self._new(list(prompt_ids))
        for t in sent_ids:  # the client has this text already
            self._step(t)

    def _step(self, token_id: int) -> str:
        try:
            return self.stream.step(self.tokenizer, token_id) or ""
        except Exception as exc:  # noqa: BLE001 - only the one error vLLM recovers from
            if not str(exc).startswith(INVALID_PREFIX):
                raise
            self.stream = self._new()
            return self.stream.step(self.tokenizer, token_id) or ""

    def text(self, token_ids: list[int]) -> str:
        return "".join(self._step(t) for t in token_ids)


async def replayed(chunks: AsyncIterator[EngineChunk], replay: Replay
                   ) -> AsyncIterator[EngineChunk]:
    """A resumed ``/v1/completions`` stream (token ids in its events) with each event's
    ``text`` as the original stream would have sent it (see :class:`Replay`)."""
    async for chunk in chunks:
        if chunk.status not in (None, 200) or not chunk.token_ids and b'"text"' not in chunk.data:
            yield chunk
            continue
        out = []
        for event in chunk.data.split(b"\n\n"):
            if not event.strip():
                continue
            payload = event.strip()[5:].strip() if event.strip().startswith(b"data:") else b""
            if not payload.startswith(b"{"):
                out.append(event + b"\n\n")
                continue
            data = json.loads(payload)
            for choice in data.get("choices") or ():
                choice["text"] = replay.text(choice.get("token_ids") or [])
            out.append(b"data: " + json.dumps(data, separators=(",", ":"),
                                              ensure_ascii=False).encode() + b"\n\n")
        yield dataclasses.replace(chunk, data=b"".join(out))


def resumed(request: EngineRequest, chunks: AsyncIterator[EngineChunk], tokenizer: Any
            ) -> AsyncIterator[EngineChunk]:
    """``chunks`` of ``request``, with the text replayed when it resumes a stream and the
    engine's tokenizer is a ``tokenizers.Tokenizer`` (else vLLM's own text)."""
    from tokenizers import Tokenizer

    if not request.resume_prompt_tokens or not isinstance(tokenizer, Tokenizer):
        return chunks
    body = json.loads(request.body)
    ids, n = body["prompt"], request.resume_prompt_tokens
    return replayed(chunks, Replay(tokenizer, ids[:n], ids[n:],
                                   body.get("skip_special_tokens", True)))
