"""LoRA adapters on a replica's vLLM engine, loaded at run time through vLLM's own serving layer.

An adapter is loaded with ``OpenAIServingModels.load_lora_adapter``, the handler behind
``vllm serve``'s ``/v1/load_lora_adapter``, called in-process: vLLM checks the adapter, loads it
into the engine (``add_lora``) and from then on serves requests whose ``model`` is its name,
lists it in ``/v1/models`` with the base as ``parent``, and names it in answers, exactly as
``vllm serve --lora-modules`` does. Eviction is vLLM's own: the workers keep at most
``max_cpu_loras`` adapters in memory (least recently used out) and ``max_loras`` per batch; an
evicted adapter that is still named loads again from its path when a request needs it.

Why runtime loading and not a LoRA resolver plugin (``vllm/lora/resolver.py``, which loads an
adapter on the first request that names it):

* Who may use which adapter, and where its files are, is the gateway's registry, per tenant. A
  resolver is a process-wide registry (``LoRAResolverRegistry``) that sees only the adapter's
  name and the base model, so it would have to look the tenancy store up from inside the engine,
  a second source of truth below the layer that owns it.
* Resolvers only run with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which also mounts the
  load/unload routes on the app ("ONLY for local development", says vLLM), and a resolver's
  failure reaches the client as "found but could not be loaded", without the reason. Loading
  explicitly keeps the routes off and returns vLLM's reason to the caller.
* The gateway decides the replica before the request is sent: ``ensure_adapter`` tells it
  whether that cost a load (for affinity routing and the load counts), and the replica's held
  set (``stats().adapters``) is what affinity routing reads.

vLLM's ``unload_lora_adapter`` only forgets the name; :meth:`VLLMAdapters.remove` also removes
the weights from the engine (``remove_lora``). Requests still running with a removed adapter
make vLLM load it again from its path, so remove an adapter's files only after its requests end.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from moestack.errors import EngineUnavailableError, InvalidAdapterError

log = logging.getLogger(__name__)


class VLLMAdapters:
    """The LoRA adapters of one ``AsyncLLM`` and the serving layer over it."""

    def __init__(self, llm: Any, serving_models: Any, model: str):
        self._llm = llm
        self._models = serving_models
        self._model = model
        self._locks: dict[str, asyncio.Lock] = {}
        self.held: frozenset[str] = frozenset()
        """Adapters the engine held at the last :meth:`ensure`, :meth:`remove` or
        :meth:`refresh`."""

    @property
    def enabled(self) -> bool:
        return self._llm.vllm_config.lora_config is not None

    async def ensure(self, name: str, path: str) -> bool:
        """See :meth:`moestack.engine.protocol.Engine.ensure_adapter`."""
        if not self.enabled:
            raise InvalidAdapterError(f"model {self._model} serves no LoRA adapters: its "
                                      "engine_args need enable_lora: true (with max_lora_rank, "
                                      "max_loras, max_cpu_loras)", param="model")
        path = os.path.abspath(path)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            known = self._models.lora_requests.get(name)
            if known is not None and known.lora_path == path:
                held = known.lora_int_id in await self._call(self._llm.list_loras(), name)
                # Held: marks it most recently used in vLLM's LRU; evicted: loads it again.
                await self._call(self._llm.add_lora(known), name)
            else:
                held = False
                if known is not None:  # a new version of the adapter, from another path
                    await self._forget(name)
                await self._load(name, path)
            await self.refresh()
            return not held

    async def remove(self, name: str) -> bool:
        """See :meth:`moestack.engine.protocol.Engine.remove_adapter`."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            known = await self._forget(name)
            await self.refresh()
        return known

    async def refresh(self) -> frozenset[str]:
        """Ask the engine which adapters it holds now (it may have evicted some since)."""
        if not self.enabled:
            return frozenset()
        ids = await self._llm.list_loras()
        self.held = frozenset(n for n, r in self._models.lora_requests.items()
                              if r.lora_int_id in ids)
        return self.held

    async def _load(self, name: str, path: str) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        result = await self._models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=path), base_model_name=self._model)
        if isinstance(result, ErrorResponse):
            self._check_alive()
            raise InvalidAdapterError(f"vLLM could not load adapter {name}: "
                                      f"{result.error.message}", param="model")
        log.info("loaded LoRA adapter %s of model %s from %s", name, self._model, path)

    async def _forget(self, name: str) -> bool:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        known = self._models.lora_requests.get(name)
        if known is None:
            return False
        await self._models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        # vLLM's unload only forgets the name; free the weights in the engine too.
        await self._call(self._llm.remove_lora(known.lora_int_id), name)
        log.info("removed LoRA adapter %s of model %s", name, self._model)
        return True

    async def _call(self, awaitable, name: str):
        try:
            return await awaitable
        except Exception as exc:  # vLLM raises whatever its loader raised; errors are its own
            self._check_alive()
            raise InvalidAdapterError(f"vLLM failed on adapter {name}: {exc}",
                                      param="model") from exc

    def _check_alive(self) -> None:
        if self._llm.errored:
            raise EngineUnavailableError(f"the engine of model {self._model} is down")
