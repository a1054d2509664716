"""Tables of the tenancy store (SQLAlchemy 2 declarative); migrations live in ``migrations/``.

Times are naive UTC ``DateTime`` columns (the same on SQLite and PostgreSQL). Money in counters
and rollups is integer nano-USD (``_nusd``, 1e-9 USD): sums of integers are exact, so a rollup
equals the sum of its raw rows to the last digit; the ledger's float ``*_usd`` columns hold the
same quantized values (``nusd / 1e9``).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from moestack.hooks import ALL_MODELS


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    allowed_models: Mapped[list] = mapped_column(JSON, nullable=False, default=lambda: [ALL_MODELS])
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    weight: Mapped[float] = mapped_column(Float, nullable=False, default=1.0)
    requests_per_min: Mapped[int | None] = mapped_column(Integer)
    tokens_per_min: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_requests: Mapped[int | None] = mapped_column(Integer)
    budget_usd: Mapped[float | None] = mapped_column(Float)
    budget_period: Mapped[str] = mapped_column(String(16), nullable=False, default="month")
    # Overflow to external providers (migration 0005_overflow): never | allowed, and the USD
    # per UTC month the tenant's overflowed requests may cost at the providers.
    overflow_policy: Mapped[str] = mapped_column(String(16), nullable=False, default="never",
                                                 server_default="never")
    overflow_budget_usd: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), nullable=False, index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class UsageRow(Base):
    """One request: written ahead at admission (``pending``), settled once at the end."""

    __tablename__ = "usage_ledger"

    request_id: Mapped[str] = mapped_column(String(96), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    key_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(32), nullable=False)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # pending | settled | lost
    status_code: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    # Token counts are 64-bit (migration 0003): a reservation is prompts x n x budget.
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reserved_usd: Mapped[float] = mapped_column(Float, nullable=False)
    charged_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    charged_usd: Mapped[float] = mapped_column(Float, nullable=False)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    baseline_costs_usd: Mapped[dict | None] = mapped_column(JSON)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    e2e_s: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    gateway_id: Mapped[str] = mapped_column(String(64), nullable=False)
    backend: Mapped[str] = mapped_column(String(64), nullable=False, default="replica",
                                         server_default="replica")  # or provider:<name>
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    adapter: Mapped[str | None] = mapped_column(String(128))  # LoRA adapter (migration 0004)

    __table_args__ = (
        Index("ix_usage_tenant_started", "tenant_id", "started_at"),
        Index("ix_usage_state_lease", "state", "lease_expires_at"),
        Index("ix_usage_gateway_state", "gateway_id", "state"),
        Index("ix_usage_started", "started_at"),
    )


class Adapter(Base):
    """A registered LoRA adapter over a configured model (migration 0004)."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(128), nullable=False)
    path: Mapped[str] = mapped_column(String(1024), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    rank: Mapped[int] = mapped_column(Integer, nullable=False)
    owner_tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), nullable=False,
                                                 index=True)
    shared_tenant_ids: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
    """Tenants besides the owner that may use it (ids; empty: private to the owner)."""
    usd_per_1m_tokens: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class TenantCounters(Base):
    """Running totals of one tenant, updated with every ledger write (see ``counters``)."""

    __tablename__ = "tenant_counters"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    inflight: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    day_start: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    day_nusd: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    month_start: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    month_nusd: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    total_nusd: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class OverflowCounters(Base):
    """What a tenant's overflowed requests cost at the providers in the current UTC month:
    reservations while they run, the providers' figures once settled
    (:mod:`moestack.tenancy.overflow_budget`)."""

    __tablename__ = "overflow_counters"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    month_start: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)
    month_nusd: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class RateBucket(Base):
    """Requests and charged tokens of one tenant started in one UTC second (RPM/TPM window)."""

    __tablename__ = "rate_buckets"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    second: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, nullable=False)
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)


class RollupKey:
    """Key columns of the rollup tables: tenant, model, endpoint, UTC hour of ``started_at``."""

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(32), primary_key=True)
    hour: Mapped[dt.datetime] = mapped_column(DateTime, primary_key=True)


class UsageRollup(RollupKey, Base):
    """Ledger rows summed per tenant, model, endpoint and UTC hour of ``started_at``."""

    __tablename__ = "usage_rollups"

    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    charged_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    charged_nusd: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_nusd: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)


class RollupBaseline(RollupKey, Base):
    """Baseline-API price of a rollup's priced rows, per baseline."""

    __tablename__ = "usage_rollup_baselines"

    baseline: Mapped[str] = mapped_column(String(64), primary_key=True)
    nusd: Mapped[int] = mapped_column(BigInteger, nullable=False)


class StoreVersion(Base):
    """One row whose ``version`` grows with every change of a tenant or key (auth caches)."""

    __tablename__ = "tenancy_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)
