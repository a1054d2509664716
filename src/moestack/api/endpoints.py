"""The API routes the gateway relays to engines, and what it reads of each request.

The gateway reads only what its request hooks and routing need
(:class:`~moestack.hooks.RequestFacts`), and relays the body as sent:

* ``model`` (routing, model access), ``stream``, ``n`` (choices to reserve for);
* the completion budget (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``);
* the prompt material, for the request's token bound (:meth:`RequestFacts.token_bound
  <moestack.hooks.RequestFacts.token_bound>`: reservation, fair queue, routing) and the prefix
  hash of routing.

Everything else (sampling, tools, structured output, ...) is vLLM's to read. A field the
engine's serving layer does not know is refused with a 400 naming it, so no parameter is ever
dropped silently (vLLM's protocol models ignore unknown fields).

Checks, in the order the relay runs them (each a 400 naming the field, before any reservation or
database write):

1. :func:`read_body`, whatever the model: valid UTF-8 JSON object, nesting at most
   :data:`MAX_JSON_DEPTH`, every number finite, no lone surrogate, ``model``/``stream`` typed,
   ``n``, the budget and the logprobs counts integers in range, and no engine-internal field
   (:data:`ENGINE_INTERNAL_FIELDS`) or Responses ``background`` (it would run after the answer,
   outside the request's reservation and metering);
2. model access (the tenant's list; a hidden model is the same 404 as a missing one, whatever
   else the body holds);
3. :func:`check_limits`: the model's ``request_limits`` (``n``, prompts, budget, logprobs,
   nesting), which keep a reservation within the ledger's 64-bit counters;
4. :func:`check_fields`: fields the model's engine does not read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from moestack.config.schema import RequestLimitsConfig
from moestack.errors import InvalidRequestError
from moestack.hooks import RequestFacts

TEMPLATE_TOKENS_PER_MESSAGE = 16
"""Allowance for chat-template tokens per message in the prompt-size upper bound."""

TEMPLATE_TOKENS_FOR_TOOLS = 512
"""Allowance for the template text that renders a request's tool definitions."""

MAX_JSON_DEPTH = 256
"""Deepest nesting any request body may have (a model's ``request_limits.max_json_depth`` is at
most this); deeper bodies are refused before the model is even looked up."""

MAX_REQUEST_INT = 2**31 - 1
"""Largest ``n`` or completion budget read as a number at all (a model's limits are lower)."""

ENGINE_INTERNAL_FIELDS = ("kv_transfer_params", "ec_transfer_params")
"""vLLM request fields that only the serving system sets (disaggregated prefill/encode: where to
pull the KV or encoder cache from); a client sending them could point an engine at another
tenant's transfer."""


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
    logprob_fields: tuple[str, ...] = ()
    """Fields asking for that many log-probabilities per token (-1: the whole vocabulary)."""

    @property
    def generates(self) -> bool:
        return bool(self.budget_fields)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", "chat.completions", "messages",
             ("max_completion_tokens", "max_tokens"), ("tools",), choices=True,
             logprob_fields=("top_logprobs", "prompt_logprobs")),
    Endpoint("/v1/completions", "completions", "prompt", ("max_tokens",), choices=True,
             list_prompts=True, templated=False, logprob_fields=("logprobs", "prompt_logprobs")),
    Endpoint("/v1/responses", "responses", "input", ("max_output_tokens",),
             ("instructions", "tools"), logprob_fields=("top_logprobs",)),
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


def read_body(endpoint: Endpoint, raw: bytes) -> tuple[RequestFacts, frozenset[str]]:
    """Parse ``raw``; its facts and top-level field names. :class:`InvalidRequestError` names
    what is wrong."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidRequestError("The request body is not valid UTF-8.") from None
    too_deep = InvalidRequestError(
        f"The request body is nested too deeply (more than {MAX_JSON_DEPTH} levels).",
        code="json_too_deep")
    try:
        body = json.loads(text)
    except ValueError:
        raise InvalidRequestError("The request body is not valid JSON.") from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    depth, not_finite = _scan(body)
    if depth > MAX_JSON_DEPTH:
        raise too_deep
    if not_finite is not None:
        raise InvalidRequestError(f"`{not_finite}` is not a finite number (NaN, Infinity or "
                                  "beyond the range of a double).", param=not_finite)
    if b"\\u" in raw and (where := _lone_surrogate(body)):
        raise InvalidRequestError(f"`{where}` holds invalid Unicode (a lone surrogate).",
                                  param=where)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("`model` is required: the id of a served model.", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidRequestError("`stream` must be a boolean.", param="stream")
    _refuse_client_forbidden(endpoint, body)
    choices = _positive_int(body, "n") if endpoint.choices else None
    max_tokens, budget_field = None, None
    for name in endpoint.budget_fields:
        if body.get(name) is not None:
            max_tokens, budget_field = _positive_int(body, name), name
            break
    logprobs, logprobs_field = 0, None
    for name in endpoint.logprob_fields:
        value = _logprobs(body, name)
        if value is not None and (logprobs_field is None or value == -1
                                  or (logprobs != -1 and value > logprobs)):
            logprobs, logprobs_field = value, name
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
                         max_tokens=max_tokens, budget_field=budget_field, logprobs=logprobs,
                         logprobs_field=logprobs_field, json_depth=depth)
    return facts, frozenset(body)


def check_limits(endpoint: Endpoint, facts: RequestFacts, limits: RequestLimitsConfig) -> None:
    """400 naming the first field past the model's ``request_limits`` (after model access, so
    a hidden model answers its 404 whatever the body asks)."""
    if facts.json_depth > limits.max_json_depth:
        raise InvalidRequestError(
            f"The request body nests {facts.json_depth} levels deep; this model takes at most "
            f"{limits.max_json_depth}.", code="json_too_deep")
    if facts.choices > limits.max_n:
        raise InvalidRequestError(f"`n` is {facts.choices}; this model takes at most "
                                  f"{limits.max_n} choices per prompt.", param="n",
                                  code="limit_exceeded")
    most = (limits.max_prompts_per_request if endpoint.generates
            else limits.max_pooling_inputs_per_request)
    if endpoint.list_prompts and facts.prompts > most:
        raise InvalidRequestError(
            f"`{endpoint.prompt_field}` holds {facts.prompts} prompts; this model takes at most "
            f"{most} in one request.", param=endpoint.prompt_field, code="limit_exceeded")
    cap = limits.max_completion_tokens
    if cap is not None and facts.max_tokens is not None and facts.max_tokens > cap:
        raise InvalidRequestError(f"`{facts.budget_field}` is {facts.max_tokens}; this model "
                                  f"generates at most {cap} tokens per choice.",
                                  param=facts.budget_field, code="limit_exceeded")
    top = limits.max_top_logprobs
    if top is not None and facts.logprobs_field is not None and not (
            0 <= facts.logprobs <= top):
        raise InvalidRequestError(
            f"`{facts.logprobs_field}` is {facts.logprobs}; this model returns between 0 and "
            f"{top} log-probabilities per token.", param=facts.logprobs_field,
            code="limit_exceeded")


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


def with_member(raw: bytes, name: str, value: str) -> bytes:
    """``raw`` (a JSON object) with member ``name`` set to the string ``value``, whatever the
    client sent: appended last, as :func:`with_priority` does (the tenant's ``cache_salt``)."""
    end = raw.rstrip().rfind(b"}")
    return b"%s,%s:%s}" % (raw[:end], json.dumps(name).encode(), json.dumps(value).encode())


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_REQUEST_INT:
        raise InvalidRequestError(f"`{name}` must be a positive integer (at most "
                                  f"{MAX_REQUEST_INT}).", param=name)
    return value


def _logprobs(body: dict, name: str) -> int | None:
    """A log-probability count: None when absent or null, else an integer (-1: vocabulary).
    (Chat's ``logprobs`` is a switch, not a count: its count is ``top_logprobs``.)"""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not (
            -1 <= value <= MAX_REQUEST_INT):
        raise InvalidRequestError(f"`{name}` must be an integer (a count of "
                                  "log-probabilities per token).", param=name)
    return value


def _refuse_client_forbidden(endpoint: Endpoint, body: dict) -> None:
    """400 for fields no tenant may set, whatever the model's engine accepts."""
    for name in ENGINE_INTERNAL_FIELDS:
        if name in body:
            raise InvalidRequestError(
                f"`{name}` is set by the serving system (disaggregated prefill), never by "
                "clients.", param=name, code="unsupported_parameter")
    if endpoint.path == "/v1/responses" and body.get("background"):
        raise InvalidRequestError(
            "`background` responses are not supported: the answer must come back on this "
            "request (to be metered and settled); send the request without `background`.",
            param="background", code="unsupported_parameter")


def _scan(body: dict) -> tuple[int, str | None]:
    """How deeply ``body`` nests, and the path of its first number that is not finite (JSON's
    ``1e400`` parses as infinity, and Python's parser accepts ``NaN``/``Infinity``). Iterative,
    stopping past :data:`MAX_JSON_DEPTH`: the recursive walks that follow must not overflow."""
    deepest, bad = 1, None
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, list):
            kinds = set(map(type, value))
            if not kinds & {dict, list, float}:  # token ids, strings: nothing to look into
                continue
            items: Any = enumerate(value)
        else:
            items = value.items()
        for key, v in items:
            kind = type(v)
            if kind is dict or kind is list:
                if depth + 1 > deepest:
                    deepest = depth + 1
                    if deepest > MAX_JSON_DEPTH:
                        return deepest, bad
                if v:
                    stack.append((v, depth + 1, _path(path, key)))
            elif kind is float and bad is None and not math.isfinite(v):
                bad = _path(path, key)
    return deepest, bad


def _path(parent: str, key: str | int) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else f"{parent}.{key}" if parent else key


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
