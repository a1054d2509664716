"""The LoRA adapter registry: who brought which adapter, over which model, and who may use it.

An adapter is registered (:func:`register_adapter`, by the admin API and ``moestack adapters
add`` through :func:`moestack.api.adapter_checks.check_and_register`) with its name, its base
model (one of the config's models, with ``lora.enabled``), its directory in the PEFT layout as
the replicas see it (the model volume), its owner tenant and the other tenants it is shared with
(none by default: private to its owner), and optionally its own price (USD per 1M tokens), with
the content hash and rank its check found. Registration checks the directory against the base
checkpoint first (files, rank against the model's ``max_lora_rank``, shapes, the
``base_model_name_or_path`` it was trained on), so a bad adapter gets a clear 4xx at
registration, not a failure at its first request. An adapter's name is
unique (409) and never a configured model's.

A gateway resolves names through :class:`AdapterCatalog`: every adapter read at once (they are
few) and read again when the store's change version moves (registrations and removals bump it
like a tenant or key change), checked at most every ``ttl_s``, so a removal reaches every gateway
within ``tenancy.auth_cache_ttl_s``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moestack.engine.protocol import AdapterRef
from moestack.errors import ConflictError, InvalidRequestError, NotFoundError
from moestack.tenancy.store import TenancyStore, _bump_version, _tenant_named
from moestack.tenancy.tables import Adapter, Tenant

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
"""What an adapter's name may be (the same alphabet as a model's name)."""


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter as plain data."""

    name: str
    base_model: str
    path: str
    sha256: str
    rank: int
    owner: str
    shared_with: tuple[str, ...]
    usd_per_1m_tokens: float | None
    created_at: dt.datetime

    def usable_by(self, tenant: str | None) -> bool:
        """Whether ``tenant`` may name it (None: tenancy off, no adapters are served)."""
        return tenant is not None and (tenant == self.owner or tenant in self.shared_with)

    def ref(self) -> AdapterRef:
        """What the engine request carries."""
        return AdapterRef(self.name, self.path, self.sha256)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "base_model": self.base_model, "path": self.path,
                "sha256": self.sha256, "rank": self.rank, "owner": self.owner,
                "shared_with": list(self.shared_with),
                "usd_per_1m_tokens": self.usd_per_1m_tokens,
                "created_at": self.created_at.isoformat() + "Z"}


def _records(s: Session, rows: Iterable[Adapter]) -> list[AdapterRecord]:
    names = dict(s.execute(select(Tenant.id, Tenant.name)).all())
    return [AdapterRecord(a.name, a.base_model, a.path, a.sha256, a.rank,
                          names.get(a.owner_tenant_id, "?"),
                          tuple(sorted(names[t] for t in a.shared_tenant_ids if t in names)),
                          a.usd_per_1m_tokens, a.created_at) for a in rows]


# -- the registry ---------------------------------------------------------------------------------

def register_adapter(store: TenancyStore, *, name: str, base_model: str, path: str,
                     sha256: str, rank: int, owner: str, shared_with: Iterable[str] = (),
                     usd_per_1m_tokens: float | None = None) -> AdapterRecord:
    """Store a checked adapter (:func:`moestack.api.adapter_checks.check_and_register` checks
    it first): 404 for an unknown tenant, 409 for a name already registered."""
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise InvalidRequestError(f"adapter name `{name[:128]}` must match "
                                  f"{ADAPTER_NAME_PATTERN}", param="name")
    if usd_per_1m_tokens is not None and not usd_per_1m_tokens >= 0:
        raise InvalidRequestError("usd_per_1m_tokens must be zero or more",
                                  param="usd_per_1m_tokens")
    try:
        with store.session() as s:
            owner_id = _tenant_named(s, owner).id
            shared = sorted({_tenant_named(s, t).id for t in shared_with if t != owner})
            row = Adapter(name=name, base_model=base_model, path=path, sha256=sha256, rank=rank,
                          owner_tenant_id=owner_id, shared_tenant_ids=shared,
                          usd_per_1m_tokens=usd_per_1m_tokens)
            s.add(row)
            s.flush()
            _bump_version(s)
            return _records(s, [row])[0]
    except IntegrityError:
        raise ConflictError(f"an adapter named `{name}` is already registered", param="name",
                            code="adapter_exists") from None


def list_adapters(store: TenancyStore, tenant: str | None = None) -> list[AdapterRecord]:
    """Registered adapters by name; with ``tenant``, those it may use."""
    with store.session() as s:
        records = _records(s, s.scalars(select(Adapter).order_by(Adapter.name)))
    return [a for a in records if tenant is None or a.usable_by(tenant)]


def _row(s, name: str) -> Adapter:
    row = s.get(Adapter, name)
    if row is None:
        raise NotFoundError(f"no adapter named `{name}`", param="name", code="adapter_not_found")
    return row


def get_adapter(store: TenancyStore, name: str) -> AdapterRecord:
    with store.session() as s:
        return _records(s, [_row(s, name)])[0]


def unregister_adapter(store: TenancyStore, name: str) -> AdapterRecord:
    """Remove an adapter from the registry (404 if it is not there); returns what it was."""
    with store.session() as s:
        row = _row(s, name)
        record = _records(s, [row])[0]
        s.delete(row)
        _bump_version(s)
        return record


class AdapterCatalog:
    """A gateway's view of the registry: every adapter, re-read when the store's change version
    moves (checked at most every ``ttl_s``; 0 checks on every lookup)."""

    def __init__(self, store: TenancyStore, ttl_s: float = 2.0):
        self.store = store
        self.ttl_s = ttl_s
        self._adapters: dict[str, AdapterRecord] = {}
        self._version: int | None = None
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()

    def _reload(self) -> None:
        started = time.monotonic()
        version = self.store.version()
        if version != self._version:
            self._adapters = {a.name: a for a in list_adapters(self.store)}
            self._version = version
        self._checked_at = started

    async def _fresh(self) -> dict[str, AdapterRecord]:
        if time.monotonic() - self._checked_at >= self.ttl_s:
            async with self._lock:
                if time.monotonic() - self._checked_at >= self.ttl_s:
                    await anyio.to_thread.run_sync(self._reload)
        return self._adapters

    async def usable(self, name: str, tenant: str | None) -> AdapterRecord | None:
        """The adapter ``name`` if ``tenant`` may use it, else None (missing or not theirs:
        the caller answers the same 404 either way)."""
        if tenant is None:
            return None
        adapter = (await self._fresh()).get(name)
        return adapter if adapter is not None and adapter.usable_by(tenant) else None

    async def visible(self, tenant: str | None) -> list[AdapterRecord]:
        """The adapters ``tenant`` may use, by name."""
        if tenant is None:
            return []
        return sorted((a for a in (await self._fresh()).values() if a.usable_by(tenant)),
                      key=lambda a: a.name)
