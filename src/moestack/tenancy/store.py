"""The tenancy store: one SQLAlchemy engine (SQLite file by default, PostgreSQL by URL).

Why the database, not a Ray actor, holds the state shared by gateway replicas: every admission
already writes its ledger row ahead of the work (the durability the ledger needs), and the limit
checks read the same rows in the same transaction, under a per-tenant row lock (``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite serialises writers with ``BEGIN IMMEDIATE``). So limits hold across
any number of replicas and processes, survive a gateway or Ray restart, and need no second copy
of the truth to keep consistent. A Ray actor would be one more single point of failure whose state
is lost when it restarts, and would still have to write the ledger.

Admission reads small per-tenant counters, never the ledger (:mod:`moestack.tenancy.counters`).

Bounded waits: every wait on the store is capped by ``storage.busy_timeout_s`` (SQLite's busy
timeout; PostgreSQL's connect, lock and pool timeouts), and there is no process-wide lock: one
writer thread per process group-commits the request path's writes
(:mod:`moestack.tenancy.writer`), reads use their own connections (WAL readers never wait for
writers). Any store failure (down, locked past the wait, read-only) surfaces as
:class:`~moestack.errors.StoreUnavailableError` (503 with Retry-After), never a driver error.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import DateTime, bindparam, column, create_engine, event, select, text, update
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from moestack.errors import InvalidRequestError, NotFoundError, StoreUnavailableError
from moestack.hooks import ALL_MODELS
from moestack.tenancy.keys import NewKey, generate_key
from moestack.tenancy.limits import TenantLimits
from moestack.tenancy.tables import ApiKey, StoreVersion, Tenant, TenantCounters, utcnow

BUDGET_PERIODS = ("day", "month", "total")
LIMIT_FIELDS = ("allowed_models", "priority", "weight", "requests_per_min", "tokens_per_min",
                "max_concurrent_requests", "budget_usd", "budget_period", "overflow_policy",
                "overflow_budget_usd")
_MIGRATION_LOCK_ID = 0x6D6F6573  # PostgreSQL advisory lock id: "moes"
STORE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
"""Driver errors meaning the store cannot serve now (down, locked, read-only, pool exhausted)."""
UNAVAILABLE_MESSAGE = ("The tenancy store is unavailable (down, locked or read-only); the request "
                       "was not served. Retry shortly.")


def sql(statement: str, times: tuple[str, ...] = (), columns: tuple[str, ...] = (),
        time_columns: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> TextClause:
    """A SQL text with its datetime parameters and result columns typed (SQLite stores times as
    text: SQLAlchemy's format must be used both ways for comparisons to hold); ``lists`` are
    parameters that expand to ``IN (...)`` lists."""
    clause = text(statement)
    if times or lists:
        clause = clause.bindparams(*[bindparam(t, type_=DateTime) for t in times],
                                   *[bindparam(name, expanding=True) for name in lists])
    if columns:
        clause = clause.columns(*[column(c, DateTime if c in time_columns else None)
                                  for c in columns])
    return clause


@contextmanager
def unavailable_as_503() -> Iterator[None]:
    """Turn a store failure into :class:`StoreUnavailableError` (message without driver text)."""
    try:
        yield
    except STORE_ERRORS as exc:
        raise StoreUnavailableError(UNAVAILABLE_MESSAGE) from exc


@dataclass(frozen=True)
class TenantInfo:
    """A tenant's settings as plain data (what the admin API and CLI show)."""

    name: str
    allowed_models: tuple[str, ...]
    priority: int
    weight: float
    requests_per_min: int | None
    tokens_per_min: int | None
    max_concurrent_requests: int | None
    budget_usd: float | None
    budget_period: str
    created_at: dt.datetime
    active_key_ids: tuple[str, ...] = ()
    overflow_policy: str = "never"
    overflow_budget_usd: float | None = None

    def as_json(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out["allowed_models"] = list(self.allowed_models)
        out["active_key_ids"] = list(self.active_key_ids)
        out["created_at"] = self.created_at.isoformat() + "Z"
        return out


def _info(t: Tenant, key_ids: tuple[str, ...] = ()) -> TenantInfo:
    return TenantInfo(t.name, tuple(t.allowed_models), t.priority, t.weight, t.requests_per_min,
                      t.tokens_per_min, t.max_concurrent_requests, t.budget_usd, t.budget_period,
                      t.created_at, key_ids, t.overflow_policy or "never",
                      t.overflow_budget_usd)


def _tenant_named(s: Session, name: str) -> Tenant:
    tenant = s.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFoundError(f"no tenant named `{name}`", param="tenant", code="tenant_not_found")
    return tenant


def _info_with_keys(s: Session, t: Tenant) -> TenantInfo:
    """``t`` with the ids of its active keys, oldest first (as :meth:`list_tenants` has them)."""
    keys = s.scalars(select(ApiKey.key_id).where(ApiKey.tenant_id == t.id,
                                                 ApiKey.revoked_at.is_(None))
                     .order_by(ApiKey.created_at))
    return _info(t, tuple(keys))


def _make_engine(url: str, busy_timeout_s: float, immediate: bool = True) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        ms = int(busy_timeout_s * 1000)
        connect_args = {}
        if parsed.get_backend_name() == "postgresql":
            connect_args = {"connect_timeout": max(1, math.ceil(busy_timeout_s)),
                            "options": f"-c lock_timeout={ms}"}
        # psycopg2 runs an executemany (a batch's settlements, admissions, counters) as pages
        # of statements, one round trip each, rather than one round trip per row.
        batch = ({"executemany_mode": "values_plus_batch"}
                 if parsed.get_driver_name() == "psycopg2" else {})
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8,
                             pool_timeout=busy_timeout_s, connect_args=connect_args, **batch)
    memory = parsed.database in (None, "", ":memory:")
    if not memory:
        path = Path(parsed.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        parsed = parsed.set(database=str(path))
    engine = create_engine(parsed, poolclass=StaticPool if memory else None,
                           connect_args={"check_same_thread": False, "timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" below issue BEGIN
        if not memory:
            # Switching to WAL takes a lock; a database already in WAL mode needs no switch
            # (so a connection opened while another process writes does not wait here).
            if dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
            # Durable across process crashes (the WAL is fsynced at checkpoints); only an OS
            # crash can lose the last commits. PostgreSQL is the store for production.
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # Writers take the write lock at the start, so check-then-insert admissions never
        # interleave; readers start a plain (deferred) transaction and never wait in WAL mode.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class TenancyStore:
    """Tenants and keys; the ledger and admission functions take a store as first argument."""

    def __init__(self, url: str, busy_timeout_s: float = 2.0):
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        self.engine = _make_engine(url, busy_timeout_s)
        self.dialect = self.engine.dialect.name
        memory = self.dialect == "sqlite" and make_url(url).database in (None, "", ":memory:")
        self.read_engine = (_make_engine(url, busy_timeout_s, immediate=False)
                            if self.dialect == "sqlite" and not memory else self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, migrate: bool = True, busy_timeout_s: float = 2.0) -> TenancyStore:
        store = cls(url, busy_timeout_s)
        if migrate:
            store.migrate()
        return store

    def close(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM write transaction: committed on success, rolled back on error."""
        with unavailable_as_503(), self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A Core write transaction (the request path's writes go through one of these)."""
        with unavailable_as_503(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction that does not wait for writers (SQLite WAL, PostgreSQL MVCC)."""
        with unavailable_as_503(), self.read_engine.connect() as conn, conn.begin():
            yield conn

    def version(self) -> int:
        """The change version: grows with every change of a tenant or key."""
        with self.read() as conn:
            return conn.execute(select(StoreVersion.version).where(StoreVersion.id == 1)
                                ).scalar_one()

    def check_writable(self) -> None:
        """Commit a real write (a probe counter beside the change version): raises
        StoreUnavailableError if the store is down, locked past the bounded wait, or read-only
        (the readiness probe)."""
        with self.begin() as conn:
            conn.execute(text("INSERT INTO tenancy_version (id, version) VALUES (0, 1) ON "
                              "CONFLICT (id) DO UPDATE SET version = tenancy_version.version "
                              "+ 1"))

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe with replicas starting at once)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", "moestack.tenancy:migrations")
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- tenants -----------------------------------------------------------------------------

    def create_tenant(self, name: str, defaults: dict[str, Any] | None = None,
                      **limits: Any) -> tuple[TenantInfo, NewKey]:
        """Create a tenant with one API key; the key's plaintext is only in the return value.

        Settings not in ``limits`` come from ``defaults`` (the CLI and admin API pass
        ``tenancy.new_tenant_defaults``; without ``allowed_models`` there the caller must name
        the models), else every model and no limit."""
        _check_limits(limits)
        if defaults is not None:
            limits = {**defaults, **limits}
            _check_limits(limits)
            if "allowed_models" not in limits:
                raise InvalidRequestError(
                    "Name the models the tenant may use (`allowed_models`, `--models` on the "
                    "command line; `*` for every model): tenancy.new_tenant_defaults gives "
                    "none.", param="allowed_models", code="allowed_models_required")
        key = generate_key()
        try:
            with self.session() as s:
                tenant = Tenant(name=name, **{"allowed_models": [ALL_MODELS], "priority": 0,
                                              "weight": 1.0, "budget_period": "month", **limits})
                s.add(tenant)
                s.flush()
                s.add(ApiKey(key_id=key.key_id, tenant_id=tenant.id,
                             secret_sha256=key.secret_sha256, label="created with tenant"))
                now = utcnow()
                s.add(TenantCounters(tenant_id=tenant.id, inflight=0,
                                     day_start=period_start("day", now), day_nusd=0,
                                     month_start=period_start("month", now), month_nusd=0,
                                     total_nusd=0))
                _bump_version(s)
                return _info(tenant, (key.key_id,)), key
        except IntegrityError:
            raise InvalidRequestError(f"a tenant named `{name}` already exists",
                                      param="name", code="tenant_exists") from None

    def list_tenants(self) -> list[TenantInfo]:
        with self.session() as s:
            keys: dict[int, list[str]] = {}
            for k in s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))
                               .order_by(ApiKey.created_at)):
                keys.setdefault(k.tenant_id, []).append(k.key_id)
            return [_info(t, tuple(keys.get(t.id, ())))
                    for t in s.scalars(select(Tenant).order_by(Tenant.name))]

    def get_tenant(self, name: str) -> TenantInfo:
        with self.session() as s:
            return _info_with_keys(s, _tenant_named(s, name))

    def set_limits(self, name: str, **limits: Any) -> TenantInfo:
        """Change some of a tenant's settings (keys of ``LIMIT_FIELDS``; None clears a limit)."""
        _check_limits(limits)
        with self.session() as s:
            tenant = _tenant_named(s, name)
            for field, value in limits.items():
                setattr(tenant, field, value)
            _bump_version(s)
            s.flush()
            return _info_with_keys(s, tenant)

    # -- keys ----------------------------------------------------------------------------------

    def create_key(self, tenant: str, label: str | None = None) -> NewKey:
        key = generate_key()
        with self.session() as s:
            tid = _tenant_named(s, tenant).id
            s.add(ApiKey(key_id=key.key_id, tenant_id=tid, secret_sha256=key.secret_sha256,
                         label=label))
            _bump_version(s)
        return key

    def revoke_key(self, key_id: str, tenant: str | None = None) -> None:
        """Revoke a key (idempotent); with ``tenant``, only a key of that tenant."""
        with self.session() as s:
            q = update(ApiKey).where(ApiKey.key_id == key_id)
            if tenant is not None:
                q = q.where(ApiKey.tenant_id == select(Tenant.id).where(Tenant.name == tenant)
                            .scalar_subquery())
            found = s.execute(q.values(revoked_at=utcnow())).rowcount
            _bump_version(s)
        if not found:
            raise NotFoundError(f"no API key `{key_id}`", param="key_id", code="key_not_found")

    def key_record(self, key_id: str) -> tuple[ApiKey, Tenant] | None:
        """A key and its tenant, read without taking the write lock."""
        with unavailable_as_503(), Session(self.read_engine, expire_on_commit=False) as s, \
                s.begin():
            row = s.execute(select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
                            .where(ApiKey.key_id == key_id)).first()
            return (row[0], row[1]) if row else None


def _bump_version(s: Session) -> None:
    """Tell every gateway's auth cache that tenants or keys changed (same transaction)."""
    s.execute(update(StoreVersion).where(StoreVersion.id == 1)
              .values(version=StoreVersion.version + 1))


def period_start(period: str, now: dt.datetime) -> dt.datetime:
    """Start of the budget period (``day``, ``month``, ``total``) containing ``now`` (naive UTC)."""
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return dt.datetime(1970, 1, 1)


NOT_NULL_FIELDS = ("allowed_models", "priority", "weight", "budget_period", "overflow_policy")
"""Settings every tenant has; the others are limits, and None clears them."""


def _check_limits(limits: dict[str, Any]) -> None:
    """Check settings against :class:`TenantLimits` (the one definition of valid values)."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown tenant setting(s): {', '.join(sorted(unknown))}")
    for f in NOT_NULL_FIELDS:
        if f in limits and limits[f] is None:
            raise InvalidRequestError(f"{f} cannot be cleared, only changed", param=f)
    try:
        TenantLimits.model_validate(limits)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        raise InvalidRequestError(f"{field}: {err['msg']}", param=field) from None
    if "allowed_models" in limits and not limits["allowed_models"]:
        raise InvalidRequestError("allowed_models must name at least one model or `*`",
                                  param="allowed_models")
