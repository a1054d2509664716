"""Admin API (``/admin/v1``, admin key) and the tenant's own usage (``GET /v1/usage``).

``GET /v1/usage`` answers from the hourly rollups (:mod:`moestack.tenancy.rollups`): the tenant's
requests, tokens and charges per hour, model and endpoint, never the operator's self-hosted cost
or baseline prices; ``since`` rounds down to its hour. ``GET /admin/v1/usage`` lists raw ledger
rows (kept for ``tenancy.raw_usage_retention_days``) and ``GET /admin/v1/usage/hourly`` the
rollups with the operator's figures.

The admin key is checked on every admin request (:mod:`.key`). A tenant key only ever reads its
own tenant's rows.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from moestack.api.admin.key import require_admin
from moestack.api.admin.protocol import KeyCreate, TenantCreate, TenantLimits
from moestack.api.context import request_context
from moestack.errors import InvalidRequestError
from moestack.hooks import RequestContext
from moestack.tenancy import ledger, rollups
from moestack.tenancy.store import NOT_NULL_FIELDS, TenancyStore
from moestack.usage import NUSD_PER_USD


admin_router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)])
tenant_router = APIRouter()


def _store(request: Request) -> TenancyStore:
    return request.app.state.tenancy.store


async def _run(fn, *args, **kwargs):
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def _usage_json(rows: list[ledger.LedgerEntry]) -> dict:
    def one(r: ledger.LedgerEntry) -> dict:
        d = dict(r.__dict__)
        d["started_at"] = r.started_at.isoformat() + "Z"
        d["finished_at"] = r.finished_at.isoformat() + "Z" if r.finished_at else None
        return d
    return {"object": "list", "data": [one(r) for r in rows]}


def _time(value: str | None, param: str):
    if value is None:
        return None
    try:
        return ledger.parse_time(value)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


@admin_router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, request: Request):
    """A setting left out takes ``tenancy.new_tenant_defaults``; ``null`` clears a limit (no
    limit), and for a setting every tenant has, takes the default."""
    limits = {f: v for f, v in body.model_dump(exclude_unset=True, exclude={"name"}).items()
              if v is not None or f not in NOT_NULL_FIELDS}
    defaults = request.app.state.config.tenancy.new_tenant_defaults.settings()
    info, key = await _run(_store(request).create_tenant, body.name, defaults, **limits)
    return JSONResponse({"tenant": info.as_json(), "key_id": key.key_id,
                         "api_key": key.plaintext}, status_code=201)


@admin_router.get("/tenants")
async def list_tenants(request: Request):
    return {"object": "list",
            "data": [t.as_json() for t in await _run(_store(request).list_tenants)]}


@admin_router.get("/tenants/{name}")
async def get_tenant(name: str, request: Request):
    return (await _run(_store(request).get_tenant, name)).as_json()


@admin_router.patch("/tenants/{name}")
async def set_limits(name: str, body: TenantLimits, request: Request):
    limits = body.model_dump(exclude_unset=True)
    return (await _run(_store(request).set_limits, name, **limits)).as_json()


@admin_router.post("/tenants/{name}/keys", status_code=201)
async def create_key(name: str, request: Request, body: KeyCreate | None = None):
    key = await _run(_store(request).create_key, name, body.label if body else None)
    return JSONResponse({"key_id": key.key_id, "api_key": key.plaintext}, status_code=201)


@admin_router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request):
    await _run(_store(request).revoke_key, key_id)
    return {"key_id": key_id, "revoked": True}


USAGE_LIMIT = Query(1000, ge=1, le=100_000, description="Most rows returned.")


@admin_router.get("/usage")
async def admin_usage(request: Request, tenant: str | None = None, since: str | None = None,
                      until: str | None = None, limit: int = USAGE_LIMIT):
    rows = await _run(ledger.query_usage, _store(request), tenant, _time(since, "since"),
                      _time(until, "until"), limit)
    return _usage_json(rows)


@admin_router.get("/usage/hourly")
async def admin_hourly_usage(request: Request, tenant: str | None = None,
                             since: str | None = None, until: str | None = None):
    rolls = await _run(rollups.query, _store(request), tenant, _time(since, "since"),
                       _time(until, "until"))
    return {"object": "list", "data": [
        {"tenant": r.tenant, **r.tenant_view(), "cost_usd": r.cost_usd,
         "baseline_costs_usd": {b: n / NUSD_PER_USD for b, n in r.baselines_nusd.items()}}
        for r in rolls]}


@tenant_router.get("/v1/usage")
async def own_usage(request: Request, since: str | None = None, until: str | None = None,
                    ctx: RequestContext = Depends(request_context)):
    principal = ctx.principal
    rolls = await _run(rollups.query, _store(request), principal.tenant,
                       _time(since, "since"), _time(until, "until"))
    data = [r.tenant_view() for r in rolls]
    totals = {f: sum(d[f] for d in data) for f in (
        "requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
        "charged_tokens")}
    totals["charged_usd"] = sum(r.charged_nusd for r in rolls) / NUSD_PER_USD
    return {"object": "list", "tenant": principal.tenant, "data": data, "totals": totals}
