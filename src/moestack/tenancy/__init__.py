"""Multi-tenancy: who may, and who pays. Tenants, hashed API keys, model lists, limits, budgets,
usage ledger and rollups.

Public names: :class:`TenancyStore` (SQLAlchemy storage + Alembic migrations), :class:`Tenancy`
(one gateway replica's tenancy, which the request hooks work through), :func:`query_usage` and
:class:`LedgerEntry` (read the ledger). Nothing here runs at import time.

Modules by role: ``store`` (engine, bounded waits, tenants and keys), ``limits`` (valid tenant
settings), ``tables`` (ORM rows; ``migrations/``), ``keys`` (key format, hashes, cache salts),
``auth_cache`` (key lookups, bounded staleness), ``throttle`` (failed-key throttle),
``admission`` (limit checks, write-ahead row), ``counters`` (per-tenant counters, RPM/TPM
buckets), ``ledger`` (settle, lost rows, retention), ``leases``, ``rollups`` (hourly sums),
``writer`` (group-committed writes), ``service`` (:class:`Tenancy`), ``hooks`` (authentication
and admission in the request path), ``adapters`` (the LoRA adapter registry). When a request runs is :mod:`moestack.scheduling`'s; the
admin API and ``/ready`` are routes of :mod:`moestack.api`.
"""

from moestack.tenancy.ledger import LedgerEntry, query_usage
from moestack.tenancy.service import Tenancy
from moestack.tenancy.store import TenancyStore, TenantInfo

__all__ = ["LedgerEntry", "Tenancy", "TenancyStore", "TenantInfo", "query_usage"]
