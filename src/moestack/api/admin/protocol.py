"""Request bodies of the admin API (pydantic); the routes are in :mod:`.routes`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from moestack.tenancy.limits import TenantLimits


class TenantCreate(TenantLimits):
    """A new tenant: settings left out take ``tenancy.new_tenant_defaults``; ``allowed_models``
    is required unless those name models."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Tenant name.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, max_length=128, description="What the key is for.")
