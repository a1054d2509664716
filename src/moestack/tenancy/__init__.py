"""Multi-tenancy: tenants, hashed API keys, model ACLs, limits, budgets, fair queue, usage ledger.

Public names: :class:`TenancyStore` (SQLAlchemy storage + Alembic migrations),
:class:`TenancyGate` (the admission hook of the serving path), :func:`query_usage` and
:class:`LedgerEntry` (read the ledger). Nothing here runs at import time.

Modules by role: ``store`` (engine, bounded waits, tenants and keys), ``admission`` (limit checks
and the write-ahead row), ``counters`` (per-tenant counters and RPM/TPM window buckets),
``ledger`` (settle, leases, lost rows, retention), ``rollups`` (hourly usage sums), ``writer``
(group-committed writes, one thread per process), ``auth_cache`` (key lookups with bounded
staleness), ``readiness`` (``GET /ready``), ``gate`` (the serving-path hook), ``fair`` (fair
queue), ``admin_routes`` (admin API and ``GET /v1/usage``).
"""

from moestack.tenancy.gate import TenancyGate
from moestack.tenancy.ledger import LedgerEntry, query_usage
from moestack.tenancy.store import TenancyStore, TenantInfo

__all__ = ["LedgerEntry", "TenancyGate", "TenancyStore", "TenantInfo", "query_usage"]
