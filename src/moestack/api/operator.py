"""The operator app: the admin API (``/admin/v1/*``) and ``GET /metrics``, never public.

It shares the gateway replica's :class:`~moestack.metering.metrics.GatewayMetrics` and
:class:`~moestack.tenancy.Tenancy` with the public app of the same replica, but is
served on its own listener (:mod:`moestack.serve.operator_listener`), so the public port, the
Ingress in front of it and anyone holding a tenant key never reach it. Per-tenant metrics
(spend, budget remaining, tokens and rejections by tenant name) are therefore only here.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from moestack.api.admin.adapters import adapters_router
from moestack.api.admin.key import check_admin_key
from moestack.api.admin.routes import admin_router
from moestack.api.backend import ModelBackend
from moestack.api.body_limit import BodyLimitMiddleware
from moestack.api.errors import install_error_handlers
from moestack.api.header_limit import HeaderLimitMiddleware
from moestack.config.schema import MoestackConfig
from moestack.metering.metrics import GatewayMetrics
from moestack.tenancy import Tenancy
from moestack.tenancy.throttle import FailedAuthThrottle


def build_operator_api(config: MoestackConfig, metrics: GatewayMetrics | None,
                       tenancy: Tenancy | None, backend: ModelBackend | None = None) -> FastAPI:
    """The operator app over the replica's ``metrics`` and ``tenancy`` (either may be None:
    then /metrics, or the admin API, is absent). Raises ConfigError for an admin key under 32
    characters, so a replica with a weak key fails to start. ``backend``: where removing a LoRA
    adapter unloads it from every replica (None: the registry only)."""
    docs = config.gateway.docs_enabled  # as on the public app: opt-in
    app = FastAPI(title="moestack operator", docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.config = config
    app.state.tenancy = tenancy
    app.state.backend = backend
    install_error_handlers(app)
    if tenancy is not None:
        check_admin_key(config.tenancy.admin_key_env)
        app.state.admin_throttle = FailedAuthThrottle(config.tenancy.admin_auth_max_failures,
                                                      config.tenancy.admin_auth_window_s)
        app.include_router(admin_router)
        app.include_router(adapters_router)

    @app.get("/health")
    async def health():
        """Liveness of this listener (the public /health and /ready report the models)."""
        return {"status": "ok"}

    if metrics is not None and config.monitoring.metrics_enabled:
        @app.get("/metrics")
        async def metrics_endpoint():
            return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.gateway.max_body_bytes)
    app.add_middleware(HeaderLimitMiddleware)
    return app
