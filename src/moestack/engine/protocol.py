"""The engine protocol: the one seam between the serving layers and an inference engine.

The wire format is the OpenAI (and Anthropic) HTTP API itself: a request is a path and the JSON
body the client sent; the answer is the status, content type and body bytes the engine's own
serving layer produced (for vLLM: vLLM's OpenAI server, in-process). moestack never re-implements
the protocol; the gateway reads the few fields tenancy and routing need and relays the rest.

Contract of :meth:`Engine.serve`:

* It yields one or more :class:`EngineChunk`. The first carries the HTTP ``status`` and
  ``content_type`` and the first body bytes (for a stream: the first event, flushed at once).
  Later chunks carry body bytes only; for streams they batch what the engine produced while the
  consumer was busy, so a slow consumer gets fewer, larger chunks and a fast one gets every event
  at once. A non-2xx first chunk is the engine's own error answer (e.g. 400 for a bad parameter).
* Every chunk carries the request's cumulative :class:`~moestack.usage.Usage` so far, as the
  engine counted it, so a consumer that stops early still knows what ran.
* If the engine fails before any chunk it raises :class:`EngineUnavailableError`; after the first
  chunk a failure ends the stream with the engine's error event, or raises the same error.
* If the consumer stops iterating (client gone), closing the generator aborts the request in the
  engine; no tokens are produced for it afterwards.

LoRA adapters: after :meth:`Engine.ensure_adapter` a request whose ``model`` is the adapter's name
runs on the base model with that adapter, as in ``vllm serve``; the engine keeps the adapters it
holds in its own least-recently-used cache, and ``stats().adapters`` says which it holds now.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from moestack.errors import InvalidAdapterError
from moestack.usage import NO_USAGE, Usage


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A registered LoRA adapter a request runs with: the replica makes it servable under
    ``name`` (:meth:`Engine.ensure_adapter`) before it serves the request."""

    name: str
    """The name clients send as ``model``."""
    path: str
    """Directory in the PEFT layout, as the replica's filesystem sees it."""
    sha256: str = ""
    """Content hash kept with the registration (see :func:`moestack.adapters.inspect_adapter`)."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One API call for the engine: ``path`` and ``body`` are relayed as they are."""

    request_id: str
    path: str
    """The API route, e.g. ``/v1/chat/completions``."""
    body: bytes
    """The JSON body (the client's, plus the ``priority`` field the gateway sets)."""
    tenant: str | None = None
    """Tenant the request runs for (set by the gateway), for tenant-aware replica routing."""
    prompt_text: str = ""
    """A canonical text of the prompt(s), for prefix-cache-aware routing."""
    estimated_tokens: int = 0
    """Prompt plus completion budget: the work the request adds to a replica."""
    adapter: AdapterRef | None = None
    """The LoRA adapter the request names (its ``model``), or None for a base model."""
    resume_prompt_tokens: int = 0
    """A resumed stream (:mod:`moestack.engine.resume`): how many of the prompt's token ids
    are the original prompt's; the rest are completion tokens the client already has."""
    drain_after_s: float | None = None
    """Set by the gateway where it can resume the stream elsewhere: a backend whose replica
    begins draining may end the stream this long after with
    :class:`~moestack.errors.ReplicaDrainingError` (the gateway resumes it on a live replica).
    None: the stream finishes on its replica."""


@dataclass(frozen=True, slots=True)
class EngineChunk:
    """Part of an engine's answer; see the module docstring for the contract."""

    data: bytes
    usage: Usage = NO_USAGE
    status: int | None = None
    """Set on the first chunk only: the HTTP status of the answer."""
    content_type: str | None = None
    """Set on the first chunk only, e.g. ``application/json`` or ``text/event-stream``."""
    token_ids: tuple[int, ...] = ()
    """Resumable streams only (see :mod:`moestack.engine.resume`): the ids of the completion
    tokens whose events are in ``data``, in order."""
    prompt_token_ids: tuple[int, ...] | None = None
    """Set on the first chunk of a resumable stream: the prompt as the engine tokenized it
    (chat: after the chat template). None: the stream cannot be resumed elsewhere."""


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves; the gateway fetches it once per model."""

    model: str
    max_model_len: int
    architecture: str
    request_fields: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Per route: the top-level body fields the engine's serving layer reads. A field outside
    the set would be silently ignored by the engine, so the gateway answers 400 naming it."""
    priority_scheduling: bool = False
    """The engine orders waiting requests by the body's ``priority`` (lower first)."""

    @property
    def routes(self) -> frozenset[str]:
        return frozenset(self.request_fields)


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for routing, autoscaling and metrics."""

    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage_ratio: float = 0.0
    adapters: frozenset[str] = frozenset()
    """The LoRA adapters the engine holds loaded now (for adapter-affinity routing)."""


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
    def serve(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Answer ``request`` (see the module docstring)."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineUnavailableError` if the engine cannot serve."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load."""

    async def ensure_adapter(self, name: str, path: str) -> bool:
        """Make LoRA adapter ``name`` (a PEFT directory at ``path``, checked at registration by
        :func:`moestack.adapters.inspect_adapter`) servable under its name. Returns True when
        this call loaded it, False when the engine held it already. The engine evicts its least
        recently used adapters past its own capacity (vLLM: ``max_cpu_loras`` in memory,
        ``max_loras`` per batch); an evicted adapter that is still named loads again on its next
        request. The same name with another ``path`` replaces the adapter. Raises
        :class:`InvalidAdapterError` when the engine cannot load it (no LoRA support, files it
        refuses) and :class:`EngineUnavailableError` when the engine is down."""
        raise InvalidAdapterError(f"model {self.info.model} serves no LoRA adapters",
                                  param="model")

    async def remove_adapter(self, name: str) -> bool:
        """Forget adapter ``name`` and free its weights: requests naming it then get the
        engine's 404. Returns whether the engine knew it."""
        return False
