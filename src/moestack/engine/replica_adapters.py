"""A replica's side of LoRA adapters: make a request's adapter servable before serving it.

:class:`ReplicaAdapters` wraps one :class:`~moestack.engine.protocol.Engine`. Before a request
naming an adapter is served, :meth:`ReplicaAdapters.ensure` calls the engine's
``ensure_adapter``: concurrent first requests for the same adapter share one call (one load),
later ones only mark it most recently used (or load it again if the engine evicted it). Errors
keep their meaning: :class:`~moestack.errors.InvalidAdapterError` (files the engine refuses, LoRA
off) is the client's 400, :class:`~moestack.errors.EngineUnavailableError` a failed replica that
the caller may fail over. Loads are counted per adapter (:attr:`ReplicaAdapters.loads`).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from moestack.engine.protocol import AdapterRef, Engine


class ReplicaAdapters:
    """The adapters of one engine, loaded on demand; one event loop drives it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loads: Counter[str] = Counter()
        """Per adapter: loads this replica made (first loads and loads after eviction)."""
        self._pending: dict[tuple[str, str], asyncio.Future[bool]] = {}

    async def ensure(self, ref: AdapterRef) -> bool:
        """Make ``ref`` servable; True when this replica loaded it for this call (or for a
        concurrent call it joined)."""
        key = (ref.name, ref.path)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(ref))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._done(key, done))
        # shield: a cancelled request (client gone) must not cancel the load others wait for
        return await asyncio.shield(pending)

    async def _load(self, ref: AdapterRef) -> bool:
        loaded = await self.engine.ensure_adapter(ref.name, ref.path)
        if loaded:
            self.loads[ref.name] += 1
        return loaded

    def _done(self, key: tuple[str, str], done: asyncio.Future[bool]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure reached the requests that waited for it

    async def remove(self, name: str) -> bool:
        """Unload ``name`` (after any load of it in progress); whether the engine knew it."""
        for key, pending in list(self._pending.items()):
            if key[0] == name:
                await asyncio.wait([pending])
        return await self.engine.remove_adapter(name)

    @property
    def total_loads(self) -> int:
        return sum(self.loads.values())
