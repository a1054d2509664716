"""Alembic migrations of the tenancy store (applied by :meth:`TenancyStore.migrate`)."""
