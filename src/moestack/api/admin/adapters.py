"""Admin API of the LoRA adapter registry (``/admin/v1/adapters``, admin key).

``POST`` checks and registers an adapter (:func:`moestack.api.adapter_checks.check_and_register`:
400 for a bad adapter, a rank over the model's ``max_lora_rank`` or a base-model mismatch, 404
for an unknown tenant, 409 for a name taken); ``GET`` lists (``?tenant=`` those a tenant may
use) or shows one; ``DELETE`` removes it from the registry, then from every replica of its base
model (the backend's ``remove_adapter``), so no replica keeps serving it.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from moestack.api.adapter_checks import check_and_register
from moestack.api.admin.key import require_admin
from moestack.tenancy import adapters as registry

adapters_router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)])


class AdapterCreate(BaseModel):
    """A LoRA adapter to register."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=registry.ADAPTER_NAME_PATTERN, description="Name clients send as "
                      "`model`; unique, and not a configured model's name.")
    base_model: str = Field(description="The configured model it runs on.")
    path: str = Field(min_length=1, max_length=1024, description="Its directory in the PEFT "
                      "layout (adapter_config.json, adapter_model.safetensors), as the replicas "
                      "see it (the model volume).")
    owner: str = Field(description="The tenant that brought it.")
    shared_with: list[str] = Field(default_factory=list, max_length=1000, description="Other "
                                   "tenants that may use it (default: none, private to owner).")
    usd_per_1m_tokens: float | None = Field(None, ge=0, description="Its own price to tenants, "
                                            "USD per 1M tokens (default: the base model's).")


def _store(request: Request):
    return request.app.state.tenancy.store


async def _run(fn, *args, **kwargs):
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@adapters_router.post("/adapters", status_code=201)
async def add_adapter(body: AdapterCreate, request: Request):
    record = await _run(check_and_register, _store(request), request.app.state.config,
                        **body.model_dump())
    return JSONResponse(record.as_json(), status_code=201)


@adapters_router.get("/adapters")
async def list_adapters(request: Request, tenant: str | None = None):
    return {"object": "list", "data": [a.as_json() for a in await _run(
        registry.list_adapters, _store(request), tenant)]}


@adapters_router.get("/adapters/{name:path}")
async def get_adapter(name: str, request: Request):
    return (await _run(registry.get_adapter, _store(request), name)).as_json()


@adapters_router.delete("/adapters/{name:path}")
async def remove_adapter(name: str, request: Request):
    record = await _run(registry.unregister_adapter, _store(request), name)
    backend = getattr(request.app.state, "backend", None)
    if backend is not None:
        await backend.remove_adapter(record.base_model, record.name)
    return {"name": record.name, "removed": True, "unloaded": backend is not None}
