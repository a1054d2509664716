"""Cached authentication: key id -> (stored hash, revoked, principal with limits), bounded staleness.

A gateway keeps what it read of a key for at most ``ttl_s`` (``tenancy.auth_cache_ttl_s``, 2 s by
default). Every half ``ttl_s``, :meth:`AuthCache.keep_fresh` (started with the gateway's
background work) reads the store's change version (one tiny row that every tenant or key change
bumps in its own transaction; see :meth:`TenancyStore.version`): unchanged, the whole cache is
trusted for another ``ttl_s``; changed, it is dropped and keys are read again. A request reads
the version itself only when that check is late (a slow or failing store), so no request waits
for it. So a revocation, a new key or a limit change made through the admin API or the CLI
reaches every gateway, on every replica and process, within ``ttl_s`` (plus one store round
trip), and the check costs two reads per ``ttl_s`` per process, not one per request. Unknown key
ids are cached too (so random keys cannot make every request read the store), bounded by
``max_entries``.
The secret is still compared with the stored hash in constant time on every request.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import anyio

from moestack.errors import AuthenticationError, StoreUnavailableError
from moestack.tenancy.admission import Principal, check_key
from moestack.tenancy.keys import parse_key
from moestack.tenancy.models import ApiKey, Tenant
from moestack.tenancy.store import TenancyStore

_Found = tuple[ApiKey, Tenant] | None


class AuthCache:
    def __init__(self, store: TenancyStore, ttl_s: float = 2.0, max_entries: int = 100_000):
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, _Found] = collections.OrderedDict()
        self._version: int | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        self._generation = 0  # grows at each clear: a read that straddles one is not kept
        self.store_reads = 0
        """Key lookups that went to the store (for tests and benchmarks)."""

    async def principal(self, api_key: str | None) -> Principal:
        """The principal of a bearer key; 401 for a missing, malformed, unknown or revoked key;
        503 if the store cannot be read and the cache cannot answer."""
        if not api_key:
            raise AuthenticationError("Missing API key: send `Authorization: Bearer <key>`.")
        parsed = parse_key(api_key)
        if parsed is None:
            return check_key(api_key, None)
        if time.monotonic() - self._checked_at >= self.ttl_s:
            await anyio.to_thread.run_sync(self._revalidate)
        key_id = parsed[0]
        with self._lock:
            hit = key_id in self._entries
            found = self._entries.get(key_id)
            if hit:
                self._entries.move_to_end(key_id)
        if not hit:
            found = await anyio.to_thread.run_sync(self._load, key_id)
        return check_key(api_key, found)

    async def keep_fresh(self) -> None:
        """Re-read the change version every half ``ttl_s`` (until cancelled), so requests do
        not wait for it; a failed read is left to the next request's own check."""
        while True:
            await asyncio.sleep(self.ttl_s / 2)
            try:
                await anyio.to_thread.run_sync(self._revalidate)
            except StoreUnavailableError:
                pass  # the next request past ttl_s reads the version itself (503 if it fails)

    def invalidate(self) -> None:
        """Forget everything (the next request reads the store)."""
        with self._lock:
            self._entries.clear()
            self._generation += 1
            self._checked_at = float("-inf")

    def _revalidate(self) -> None:
        started = time.monotonic()
        version = self.store.version()
        with self._lock:
            if version != self._version:
                self._entries.clear()
                self._generation += 1
                self._version = version
            self._checked_at = started

    def _load(self, key_id: str) -> _Found:
        generation = self._generation
        found = self.store.key_record(key_id)
        self.store_reads += 1
        with self._lock:
            if generation != self._generation:
                return found
            self._entries[key_id] = found
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return found
