"""What a tenant's settings may be: the one definition of valid values (pydantic).

The store checks every change against it (:meth:`TenancyStore.create_tenant
<moestack.tenancy.store.TenancyStore.create_tenant>`, ``set_limits``), whoever makes it: the CLI
or the admin API, whose request bodies (:mod:`moestack.api.admin.protocol`) build on it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

INT_COLUMN_MAX = 2**31 - 1
"""Largest value of the limits' INTEGER columns (32-bit on PostgreSQL)."""
USD_MAX = 1e12


class TenantLimits(BaseModel):
    """Settings of a tenant; in a PATCH only the fields sent change (null clears a limit)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    allowed_models: list[str] | None = Field(None, description='Model names, or ["*"] for all.')
    priority: int | None = Field(None, ge=0, le=9, description="Tier; 0 runs first (vLLM).")
    weight: float | None = Field(None, gt=0, le=1e6, description="Fair-share weight (tokens).")
    requests_per_min: int | None = Field(None, ge=0, le=INT_COLUMN_MAX,
                                         description="Requests per minute.")
    tokens_per_min: int | None = Field(None, ge=0, le=INT_COLUMN_MAX, description="Prompt + "
                                       "completion tokens per minute (max completion reserved "
                                       "at admission).")
    max_concurrent_requests: int | None = Field(None, ge=0, le=INT_COLUMN_MAX,
                                                description="Requests in flight.")
    budget_usd: float | None = Field(None, ge=0, le=USD_MAX, description="USD per budget period.")
    budget_period: Literal["day", "month", "total"] | None = Field(
        None, description="Budget period: UTC day, UTC month, or the tenant's lifetime.")
    overflow_policy: Literal["never", "allowed"] | None = Field(
        None, description="`allowed`: requests may go to an external provider when the cluster "
        "is full (data leaves the house); `never` (default): they wait.")
    overflow_budget_usd: float | None = Field(None, ge=0, le=USD_MAX, description="USD per UTC "
                                              "month the tenant's overflowed requests may cost "
                                              "at the providers (null: no cap, as for "
                                              "`budget_usd`).")
