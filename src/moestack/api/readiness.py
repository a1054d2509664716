"""Readiness of the gateway: ``GET /ready`` (for the chart's readiness probe).

``/health`` says whether the models answer; ``/ready`` also says whether requests can be admitted:
with tenancy on, the store must take its write lock within the bounded wait
(``storage.busy_timeout_s``) and accept a write (``TenancyStore.check_writable``). A down,
locked or read-only store makes it answer 503 with Retry-After, so the probe takes the gateway
out of rotation until the store is back (requests that still arrive get the same 503 from
admission). The body names no driver text.

``/ready`` is public and unauthenticated, and the check commits a write: so one check runs at a
time, shared by every caller that arrives meanwhile, and a passed check answers for
:data:`PROBE_MAX_AGE_S` (:class:`StoreProbe`). However many callers, a healthy store sees at most
one probe write per ``PROBE_MAX_AGE_S`` per gateway replica, a failing one at most one probe at
a time (a failed check is not kept: the next caller checks again, so recovery shows at once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from moestack.errors import StoreUnavailableError
from moestack.tenancy.store import TenancyStore


@dataclass(frozen=True)
class StoreReadiness:
    ready: bool
    detail: str
    checked_in_s: float


PROBE_MAX_AGE_S = 1.0
"""How long a store check answers ``/ready``: well under a probe period (5 s in the chart)."""


def check_store(store: TenancyStore) -> StoreReadiness:
    """Commit one probe write (see :meth:`TenancyStore.check_writable`); bounded by
    ``busy_timeout_s``."""
    started = time.monotonic()
    try:
        store.check_writable()
    except StoreUnavailableError:
        return StoreReadiness(False, "unavailable (down, locked past the wait, or read-only)",
                              time.monotonic() - started)
    return StoreReadiness(True, "ok", time.monotonic() - started)


class StoreProbe:
    """The store's readiness: a passed check is kept for ``max_age_s``; callers that arrive
    while a check runs wait for that one (single flight)."""

    def __init__(self, store: TenancyStore, max_age_s: float = PROBE_MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.max_age_s = max_age_s
        self._clock = clock
        self._last: StoreReadiness | None = None
        self._last_at = float("-inf")
        self._running: asyncio.Future[StoreReadiness] | None = None

    async def readiness(self) -> StoreReadiness:
        if self._last is not None and self._clock() - self._last_at < self.max_age_s:
            return self._last
        if self._running is None:
            self._running = asyncio.ensure_future(self._check())
        # Shielded: a caller that leaves does not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    async def _check(self) -> StoreReadiness:
        started = self._clock()
        try:
            result = await anyio.to_thread.run_sync(check_store, self.store)
            if result.ready:
                self._last, self._last_at = result, started
            else:
                self._last = None
            return result
        finally:
            self._running = None


def store_probe(app) -> StoreProbe:
    """The app's :class:`StoreProbe` over its tenancy store (made on first use)."""
    probe = getattr(app.state, "store_probe", None)
    if probe is None:
        probe = app.state.store_probe = StoreProbe(app.state.tenancy.store)
    return probe


ready_router = APIRouter()


@ready_router.get("/ready")
async def ready(request: Request):
    gate = getattr(request.app.state, "tenancy", None)
    if gate is None:
        return {"status": "ready", "store": "not used (tenancy off)"}
    result = await store_probe(request.app).readiness()
    if result.ready:
        return {"status": "ready", "store": result.detail}
    err = StoreUnavailableError("The tenancy store is unavailable: " + result.detail + ".")
    return JSONResponse({"status": "unavailable", "store": result.detail, **err.to_openai()},
                        status_code=503, headers=err.headers())
