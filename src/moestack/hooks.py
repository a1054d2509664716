"""The gateway's request hooks: the context one request carries through them, and their protocol.

Every request goes one way through the gateway: a chain of hooks, each owned by the room whose
job it is, composed and run by the API layer (:mod:`moestack.api.chain`)::

    authentication (tenancy) -> admission (tenancy) -> scheduling (scheduling) -> metering

in the spirit of the governance middleware chain of Ray Serve LLM (before inference, after
inference, on complete). The three points a hook may use:

* :meth:`RequestHook.on_request`: the request arrived, its body not read yet (who is calling:
  a bad key is refused before anything about the body is said);
* :meth:`RequestHook.before_inference`: the body is read and checked, the model resolved for
  the caller, the engine not called yet (limits, reservation, fair queue). A hook refuses by
  raising a :class:`~moestack.errors.MoestackError`; a hook that raises undoes its own part.
* :meth:`RequestHook.on_complete`: the request's :class:`~moestack.usage.RequestRecord` is known
  (however it ended), exactly once, for every hook whose ``before_inference`` returned, in
  reverse order: the last hook in prices the request first (metering sets ``context.cost``),
  the fair queue frees the slot, then tenancy settles the ledger row with that price.

Upstream's after-inference point rewrites the response; the gateway relays the engine's bytes as
they are, so no hook has one. Everything a hook learns goes on the :class:`RequestContext`,
which the request carries from the first hook to the last: the caller's :class:`Principal`
travels there, nowhere else.

The types the rooms share (principal, request facts, the context) live here, below them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moestack.usage import RequestCost, RequestRecord

ALL_MODELS = "*"
"""In a tenant's model list: every model, also those added later."""


def allows_model(allowed_models: tuple[str, ...] | list[str], model: str) -> bool:
    """Whether a tenant's model list (``*`` for all) admits ``model``."""
    return ALL_MODELS in allowed_models or model in allowed_models


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the tenant behind an API key, with the tenant's limits."""

    tenant_id: int
    tenant: str
    key_id: str
    priority: int
    """Tier of the fair queue and the engine (0 runs first, as in vLLM)."""
    weight: float
    """Fair-share weight (tokens)."""
    allowed_models: tuple[str, ...]
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_concurrent_requests: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"
    overflow_policy: str = "never"
    """``never`` or ``allowed``: whether requests may overflow to an external provider."""
    overflow_budget_usd: float | None = None
    """USD per UTC month the tenant's overflowed requests may cost at the providers."""

    def allows(self, model: str) -> bool:
        return allows_model(self.allowed_models, model)


@dataclass(frozen=True)
class TokenBound:
    """An upper bound of the tokens one request can use."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestFacts:
    """What the gateway read of one request body (:func:`moestack.api.endpoints.read_body`)."""

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
    budget_field: str | None = None
    """The field ``max_tokens`` came from."""
    logprobs: int = 0
    """The largest log-probability count asked for (-1: the whole vocabulary)."""
    logprobs_field: str | None = None
    json_depth: int = 1
    """How deeply the body's objects and arrays nest (the body itself is 1)."""

    def token_bound(self, max_model_len: int, generates: bool = True) -> TokenBound:
        """The most the request can use: every prompt at its byte bound (capped at the
        context), every choice of every prompt at its full completion budget (none for a route
        that generates nothing). Routing weighs replicas by it, admission reserves it, the fair
        queue charges it until the real count is known."""
        prompt = min(self.prompt_tokens_bound, max_model_len * self.prompts)
        per_choice = min(self.max_tokens or max_model_len, max_model_len) if generates else 0
        return TokenBound(prompt, per_choice * self.choices * self.prompts)


@dataclass(eq=False)
class RequestContext:
    """One request on its way through the hooks; each field says who sets it."""

    request_id: str
    """The request's id in the usage ledger (and the engine's request id)."""
    api_key: str | None = field(default=None, repr=False)
    """The key as the client sent it (API layer); cleared once ``on_request`` ran."""
    client: str | None = None
    """The client's address (API layer): failed authentications are throttled by it."""
    principal: Principal | None = None
    """Who is calling (authentication); None while tenancy is off."""
    endpoint: str = ""
    """The route's name in the ledger and metrics (API layer)."""
    facts: RequestFacts | None = None
    """What the body says (API layer), set before ``before_inference``."""
    tokens: TokenBound | None = None
    """The request's token bound for its model (API layer), set with ``facts``."""
    adapter: str | None = None
    """The LoRA adapter the request names (API layer); ``facts.model`` is then its base."""
    adapter_usd_per_1m_tokens: float | None = None
    """The adapter's own price, if its registration gives one (API layer; metering charges
    it in place of the base model's)."""
    cache_salt: str | None = None
    """The tenant's prefix-cache salt (admission): sent as vLLM's ``cache_salt`` and salting
    the prefix routing key, so tenants share neither cached blocks nor prefix affinity."""
    priority: int = 0
    """Engine priority (scheduling; vLLM's, lower runs first); 0 unscheduled."""
    backend: str = "replica"
    """Who answers (overflow): ``replica``, or ``provider:<name>`` (the fair queue is skipped)."""
    max_queue_wait_s: float | None = None
    """Longest wait in the fair queue (overflow sets it for a tenant that may overflow): past
    it the scheduling hook gives up the wait and raises ``QueueWaitExceeded``."""
    record: RequestRecord | None = None
    """What the request did (API layer), set before ``on_complete``."""
    cost: RequestCost | None = None
    """Its price (metering), set first thing in ``on_complete``."""
    hooks_entered: int = 0
    """How many hooks' ``before_inference`` returned (:class:`~moestack.api.chain.HookChain`)."""

    @property
    def tenant(self) -> str | None:
        return self.principal.tenant if self.principal is not None else None


class RequestHook:
    """One room's part of the request path; a hook overrides the points it needs."""

    async def on_request(self, ctx: RequestContext) -> None:
        """The request arrived; its body is not read yet."""

    async def before_inference(self, ctx: RequestContext) -> None:
        """The body is read and checked; raise to refuse the request (undoing what this hook
        did), return to let it go on."""

    async def on_complete(self, ctx: RequestContext) -> None:
        """``ctx.record`` is set: release what this hook holds for the request (called once,
        if ``before_inference`` returned)."""
