"""Multi-tenancy: tenants, hashed API keys, model ACLs, limits, budgets, fair queue, usage ledger.

Public names: :class:`TenancyStore` (SQLAlchemy storage + Alembic migrations),
:class:`TenancyGate` (the admission hook of the serving path), :func:`query_usage` and
:class:`LedgerEntry` (read the ledger). Nothing here runs at import time.
"""

from moestack.tenancy.gate import TenancyGate
from moestack.tenancy.ledger import LedgerEntry, query_usage
from moestack.tenancy.store import TenancyStore, TenantInfo

__all__ = ["LedgerEntry", "TenancyGate", "TenancyStore", "TenantInfo", "query_usage"]
