"""The API routes the gateway relays to engines, and what it reads of each request.

The gateway reads only what tenancy, routing and metering need, and relays the body as sent:

* ``model`` (routing, model access), ``stream``, ``n`` (choices to reserve for);
* the completion budget (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``);
* the prompt material, for the reservation's upper bound and the prefix hash of routing.

Everything else (sampling, tools, structured output, logprobs, ...) is vLLM's to read. A field
the engine's serving layer does not know is refused with a 400 naming it, so no parameter is
ever dropped silently (vLLM's protocol models ignore unknown fields).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moestack.errors import InvalidRequestError

TEMPLATE_TOKENS_PER_MESSAGE = 16
"""Allowance for chat-template tokens per message in the prompt-size upper bound."""

TEMPLATE_TOKENS_FOR_TOOLS = 512
"""Allowance for the template text that renders a request's tool definitions."""


@dataclass(frozen=True)
class Endpoint:
    """One relayed route."""

    path: str
    name: str
    """How the usage ledger and metrics name it."""
    prompt_field: str | None
    """The field holding the prompt(s); for ``list_prompts``, a list there is several prompts."""
    budget_fields: tuple[str, ...] = ()
    """Fields giving the completion budget, first present wins; empty: the route generates
    nothing (tokenize, embeddings)."""
    extra_prompt_fields: tuple[str, ...] = ()
    """Further fields rendered into the prompt (system text, instructions, tool definitions)."""
    choices: bool = False
    """The route honours ``n``."""
    list_prompts: bool = False
    anthropic: bool = False
    """Errors are shaped the Anthropic way, and ``x-api-key`` carries the key."""
    templated: bool = True
    """The prompt goes through the chat template (which adds tokens per message); False: the
    text is tokenized as it is (one special token per prompt at most)."""

    @property
    def generates(self) -> bool:
        return bool(self.budget_fields)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", "chat.completions", "messages",
             ("max_completion_tokens", "max_tokens"), ("tools",), choices=True),
    Endpoint("/v1/completions", "completions", "prompt", ("max_tokens",), choices=True,
             list_prompts=True, templated=False),
    Endpoint("/v1/responses", "responses", "input", ("max_output_tokens",),
             ("instructions", "tools")),
    Endpoint("/v1/messages", "messages", "messages", ("max_tokens",), ("system", "tools"),
             anthropic=True),
    Endpoint("/v1/messages/count_tokens", "messages.count_tokens", "messages", (),
             ("system", "tools"), anthropic=True),
    Endpoint("/v1/embeddings", "embeddings", "input", list_prompts=True, templated=False),
    Endpoint("/v1/score", "score", "text_1", extra_prompt_fields=("text_2",), templated=False),
    Endpoint("/v1/rerank", "rerank", "query", extra_prompt_fields=("documents",),
             templated=False),
    Endpoint("/classify", "classify", "input", list_prompts=True, templated=False),
    Endpoint("/pooling", "pooling", "input", list_prompts=True, templated=False),
    Endpoint("/tokenize", "tokenize", "prompt", extra_prompt_fields=("messages", "tools")),
    Endpoint("/detokenize", "detokenize", "tokens"),
)


STREAM_END_EVENTS = (b"data: [DONE]", b"event: message_stop", b"event: response.completed",
                     b"event: response.incomplete", b"event: response.failed")
"""How the last event of a streamed answer starts: OpenAI chat and completions, Anthropic
messages, Responses."""


def ends_stream(data: bytes) -> bool:
    """Whether ``data`` (the tail of an SSE answer) ends with the answer's last event."""
    return data.rstrip(b"\n").rpartition(b"\n\n")[2].startswith(STREAM_END_EVENTS)


@dataclass(frozen=True)
class RequestFacts:
    """What the gateway read of one request body."""

    model: str
    stream: bool
    prompt_text: str
    """The prompt material as one canonical text, for prefix hashing."""
    prompt_tokens_bound: int
    """An upper bound of the prompt tokens of all prompts (before the context cap)."""
    prompts: int
    choices: int
    """``n``: completions per prompt."""
    max_tokens: int | None
    """The completion budget per choice; None: up to the context."""


def read_body(endpoint: Endpoint, raw: bytes) -> tuple[RequestFacts, frozenset[str]]:
    """Parse ``raw``; its facts and top-level field names. :class:`InvalidRequestError` names
    what is wrong."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidRequestError("The request body is not valid UTF-8.") from None
    try:
        body = json.loads(text)
    except ValueError:
        raise InvalidRequestError("The request body is not valid JSON.") from None
    except RecursionError:
        raise InvalidRequestError("The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    if b"\\u" in raw and (where := _lone_surrogate(body)):
        raise InvalidRequestError(f"`{where}` holds invalid Unicode (a lone surrogate).",
                                  param=where)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("`model` is required: the id of a served model.", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidRequestError("`stream` must be a boolean.", param="stream")
    choices = _positive_int(body, "n") if endpoint.choices else None
    max_tokens = None
    for name in endpoint.budget_fields:
        if body.get(name) is not None:
            max_tokens = _positive_int(body, name)
            break
    prompt = body.get(endpoint.prompt_field) if endpoint.prompt_field else None
    prompts = (len(prompt) if endpoint.list_prompts and isinstance(prompt, list) and prompt
               and not isinstance(prompt[0], int) else 1)
    extra = [body[f] for f in endpoint.extra_prompt_fields if body.get(f) is not None]
    texts: list[str] = []
    _strings(prompt, texts)
    for value in extra:
        _strings(value, texts)
    messages = len(prompt) if isinstance(prompt, list) else 1
    template = (TEMPLATE_TOKENS_PER_MESSAGE * (messages + 1) if endpoint.templated
                else prompts)  # a chat template's tokens, else one special token per prompt
    bound = (sum(len(t.encode()) for t in texts) + _token_ids(prompt) + template
             + (TEMPLATE_TOKENS_FOR_TOOLS if body.get("tools") else 0))
    facts = RequestFacts(model=model, stream=bool(stream), prompt_text="\x1e".join(texts),
                         prompt_tokens_bound=bound, prompts=prompts, choices=choices or 1,
                         max_tokens=max_tokens)
    return facts, frozenset(body)


def estimated_tokens(endpoint: Endpoint, facts: RequestFacts, max_model_len: int) -> int:
    """The work a request adds to a replica, for routing: prompts plus completion budgets."""
    budget = min(facts.max_tokens or max_model_len, max_model_len) if endpoint.generates else 0
    return (min(facts.prompt_tokens_bound, max_model_len * facts.prompts)
            + budget * facts.prompts * facts.choices)


def endpoint_at(path: str) -> Endpoint:
    return next(e for e in ENDPOINTS if e.path == path)


def check_fields(endpoint: Endpoint, fields: frozenset[str], accepted: frozenset[str]) -> None:
    """400 naming the fields the engine would ignore."""
    if unknown := sorted(fields - accepted):
        raise InvalidRequestError(
            f"Unsupported parameter(s) for {endpoint.path}: "
            f"{', '.join('`%s`' % u for u in unknown)}. The model's engine does not read them, "
            "so they would have no effect.", param=unknown[0], code="unsupported_parameter")


def with_priority(raw: bytes, priority: int) -> bytes:
    """``raw`` (a JSON object) with ``priority`` set, whatever the client sent.

    Appended as a last member: JSON parsers, vLLM's included, keep the last of duplicate keys,
    so a client-sent ``priority`` is overridden without re-encoding the body.
    """
    end = raw.rstrip().rfind(b"}")
    return b"%s,\"priority\":%d}" % (raw[:end], priority)


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError(f"`{name}` must be a positive integer.", param=name)
    return value


def _strings(value: Any, out: list[str]) -> None:
    """Every string inside ``value`` (message contents, content parts, tool schemas), in order."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def _token_ids(prompt: Any) -> int:
    """Token ids given as numbers (completions and tokenize prompts, detokenize tokens)."""
    if isinstance(prompt, list):
        return sum(_token_ids(p) for p in prompt) if prompt and isinstance(prompt[0], list) \
            else sum(1 for p in prompt if isinstance(p, int))
    return 0


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The path of the first string holding a lone surrogate (JSON ``"\\ud800"``), if any."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, v in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return where or "body"
        path = f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
        if (found := _lone_surrogate(v, path.lstrip("."))) is not None:
            return found
    return None
