"""The admin API (``/admin/v1``, operator listener) and a tenant's own usage (``GET /v1/usage``):
request bodies in :mod:`.protocol`, routes in :mod:`.routes`, over :mod:`moestack.tenancy`."""
