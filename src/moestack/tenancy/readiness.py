"""Readiness of the tenancy store: ``GET /ready`` (for the chart's readiness probe).

``/health`` says whether the models answer; ``/ready`` also says whether requests can be admitted:
with tenancy on, the store must take its write lock within the bounded wait
(``storage.busy_timeout_s``) and accept a write. A down, locked or read-only store makes it answer
503 with Retry-After, so the probe takes the gateway out of rotation until the store is back
(requests that still arrive get the same 503 from admission). The body names no driver text.
"""

from __future__ import annotations

import time
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


def check_store(store: TenancyStore) -> StoreReadiness:
    """Take the store's write lock and write nothing; bounded by ``busy_timeout_s``."""
    started = time.monotonic()
    try:
        store.check_writable()
    except StoreUnavailableError:
        return StoreReadiness(False, "unavailable (down, locked past the wait, or read-only)",
                              time.monotonic() - started)
    return StoreReadiness(True, "ok", time.monotonic() - started)


ready_router = APIRouter()


@ready_router.get("/ready")
async def ready(request: Request):
    gate = getattr(request.app.state, "tenancy", None)
    if gate is None:
        return {"status": "ready", "store": "not used (tenancy off)"}
    result = await anyio.to_thread.run_sync(check_store, gate.store)
    if result.ready:
        return {"status": "ready", "store": result.detail}
    err = StoreUnavailableError("The tenancy store is unavailable: " + result.detail + ".")
    return JSONResponse({"status": "unavailable", "store": result.detail, **err.to_openai()},
                        status_code=503, headers=err.headers())
