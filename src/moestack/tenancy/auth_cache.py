"""Cached authentication: key id -> (stored hash, revoked, principal and limits), bounded staleness.

A gateway keeps what it read of a key for at most ``ttl_s`` (``tenancy.auth_cache_ttl_s``, 2 s by
default). Every half ``ttl_s``, :meth:`AuthCache.keep_fresh` (started with the gateway's
background work) reads the store's change version (one tiny row that every tenant or key change
bumps in its own transaction; see :meth:`TenancyStore.version`): unchanged, the whole cache is
trusted for another ``ttl_s``; changed, it is dropped and keys are read again. A request reads
the version itself only when that check is late (a slow or failing store), so no request waits
for it. So a revocation, a new key or a limit change made through the admin API or the CLI
reaches every gateway, on every replica and process, within ``ttl_s`` (plus one store round
trip), and the check costs two reads per ``ttl_s`` per process, not one per request.
The secret is still compared with the stored hash in constant time on every request.

What random or guessed keys cost:

* a well-formed key id the store does not hold is remembered in a separate negative cache
  (``max_unknown_entries``, least recently used first out): asking again costs no store read,
  and however many ids are tried, the keys that exist (``max_entries``) are never evicted by them;
* concurrent requests with the same unknown-to-the-cache key id share one store read;
* with a ``throttle`` (:class:`~moestack.tenancy.throttle.FailedAuthThrottle`), a client
  address past its failures gets 429 with ``Retry-After`` before any lookup, so fresh random
  ids cost at most ``max_failures`` store reads per window per address. A key the cache holds
  as existing is still checked for a throttled address (no store read): a client that shares
  its address with others (a NAT, a proxy) does not lock their cached keys out.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import anyio

from moestack.errors import AuthenticationError, RateLimitError, StoreUnavailableError
from moestack.hooks import Principal
from moestack.tenancy.admission import check_key
from moestack.tenancy.keys import parse_key
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.tables import ApiKey, Tenant
from moestack.tenancy.throttle import FailedAuthThrottle

_Found = tuple[ApiKey, Tenant] | None


class AuthCache:
    def __init__(self, store: TenancyStore, ttl_s: float = 2.0, max_entries: int = 100_000,
                 max_unknown_entries: int = 10_000, throttle: FailedAuthThrottle | None = None):
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_unknown_entries = max_unknown_entries
        self.throttle = throttle
        self._entries: collections.OrderedDict[str, tuple[ApiKey, Tenant]] = \
            collections.OrderedDict()
        self._unknown: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future[_Found]] = {}
        self._version: int | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        self._generation = 0  # grows at each clear: a read that straddles one is not kept
        self.store_reads = 0
        """Key lookups that went to the store (for tests and benchmarks)."""

    def __len__(self) -> int:
        """Keys held as existing (the negative cache apart)."""
        return len(self._entries)

    async def principal(self, api_key: str | None, client: str | None = None) -> Principal:
        """The principal of a bearer key; 401 for a missing, malformed, unknown or revoked key
        (counted against ``client`` by the throttle); 429 for a throttled ``client`` unless the
        key is one the cache holds; 503 if the store cannot be read and the cache cannot
        answer."""
        try:
            return await self._principal(api_key, client)
        except AuthenticationError:
            if self.throttle is not None and client is not None:
                self.throttle.failed(client)
            raise

    async def _principal(self, api_key: str | None, client: str | None) -> Principal:
        wait = (self.throttle.retry_after_s(client)
                if self.throttle is not None and client is not None else None)
        parsed = parse_key(api_key) if api_key else None
        if parsed is not None and time.monotonic() - self._checked_at >= self.ttl_s:
            await anyio.to_thread.run_sync(self._revalidate)
        key_id = parsed[0] if parsed else None
        with self._lock:
            found = self._entries.get(key_id) if key_id else None
            if found is not None:
                self._entries.move_to_end(key_id)
            unknown = key_id in self._unknown
            if unknown:
                self._unknown.move_to_end(key_id)
        if found is None and wait is not None:
            raise RateLimitError("Too many failed authentications from this address; retry "
                                 "later.", retry_after_s=wait, code="auth_throttled")
        if not api_key:
            raise AuthenticationError.missing_key()
        if parsed is None or unknown:
            return check_key(api_key, None)
        if found is None:
            found = await self._lookup(key_id)
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

    def _clear(self) -> None:
        self._entries.clear()
        self._unknown.clear()
        self._generation += 1

    def _revalidate(self) -> None:
        started = time.monotonic()
        version = self.store.version()
        with self._lock:
            if version != self._version:
                self._clear()
                self._version = version
            self._checked_at = started

    async def _lookup(self, key_id: str) -> _Found:
        """One store read per key id at a time: concurrent callers share it (the read runs on
        even if the caller that started it leaves)."""
        task = self._loading.get(key_id)
        if task is None:
            task = asyncio.ensure_future(anyio.to_thread.run_sync(self._load, key_id))
            self._loading[key_id] = task
            task.add_done_callback(lambda t: (self._loading.pop(key_id, None),
                                              t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    def _load(self, key_id: str) -> _Found:
        generation = self._generation
        found = self.store.key_record(key_id)
        self.store_reads += 1
        with self._lock:
            if generation != self._generation:
                return found
            if found is None:
                self._unknown[key_id] = None
                while len(self._unknown) > self.max_unknown_entries:
                    self._unknown.popitem(last=False)
            else:
                self._entries[key_id] = found
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return found
