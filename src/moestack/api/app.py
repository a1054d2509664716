"""Build the OpenAI-compatible ASGI app over any :class:`ModelBackend`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moestack.api.backend import ModelBackend
from moestack.api.body_limit import BodyLimitMiddleware
from moestack.api.endpoints import ENDPOINTS, Endpoint
from moestack.api.errors import install_error_handlers
from moestack.api.header_limit import CredentialHeaderLimitMiddleware
from moestack.api.models.routes import router as models_router
from moestack.api.relay import Relay, UsageSink
from moestack.config.schema import MoestackConfig
from moestack.metering.metrics import GatewayMetrics
from moestack.metering.rejections import RejectionMetrics
from moestack.tenancy.admin_routes import tenant_router
from moestack.tenancy.gate import TenancyGate, require_tenant
from moestack.tenancy.readiness import ready_router


def build_api(config: MoestackConfig, backend: ModelBackend,
              sinks: Sequence[UsageSink] = (), tenancy: TenancyGate | None = None) -> FastAPI:
    """The gateway's public HTTP app: the relayed API routes (:data:`ENDPOINTS`), /v1/models,
    /health, errors, body and header limits.

    With ``config.tenancy.enabled`` the OpenAI routes need a tenant key and run through
    ``tenancy`` (built from ``config.storage.url`` if not given). The admin API and /metrics
    are not here: :func:`moestack.api.operator.build_operator_api` serves them on the
    operator listener over this app's ``state.metrics`` and ``state.tenancy``.
    """
    docs = config.gateway.docs_enabled  # /docs and /openapi.json reveal every route: opt-in
    app = FastAPI(title="moestack", version="0.1.0",
                  description="OpenAI-compatible API of moestack.",
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    metrics = GatewayMetrics(config=config)
    if config.tenancy.enabled and tenancy is None:
        tenancy = TenancyGate.from_config(config)
    app.state.tenancy = tenancy if config.tenancy.enabled else None
    if app.state.tenancy is not None:
        app.state.tenancy.on_budget_remaining = metrics.set_budget_remaining
        if metrics.cost_model is not None:
            app.state.tenancy.pricer = metrics.cost_model.price
        for m in config.models:
            queue = app.state.tenancy.queue(m.name)
            metrics.track_queue_depth(m.name, queue.waiting, lambda q=queue: q.max_inflight)
            metrics.track_fairness(m.name, lambda name=m.name: app.state.tenancy.fairness(name))
    relay = Relay(config, backend, [metrics, *sinks], admission=app.state.tenancy)
    app.state.config = config
    app.state.created = int(time.time())
    app.state.metrics = metrics
    app.state.relay = relay
    install_error_handlers(app)
    auth = [Depends(require_tenant)] if app.state.tenancy else []
    for endpoint in ENDPOINTS:
        app.add_api_route(endpoint.path, _route(relay, endpoint), methods=["POST"],
                          dependencies=auth, name=endpoint.name,
                          summary=f"{endpoint.path}, relayed to the model's engine")
    app.include_router(models_router, dependencies=auth)
    if app.state.tenancy:  # the admin API is on the operator listener (moestack.api.operator)
        app.include_router(tenant_router)
    app.include_router(ready_router)

    @app.get("/health")
    async def health(request: Request):
        problems = {m: why for m, why in (await backend.check_health()).items() if why}
        if problems:
            return JSONResponse({"status": "unhealthy", "models": problems}, status_code=503)
        return {"status": "ok"}

    app.add_middleware(RejectionMetrics, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.gateway.max_body_bytes)
    app.add_middleware(CredentialHeaderLimitMiddleware)
    return app


def _route(relay: Relay, endpoint: Endpoint):
    async def relayed(request: Request) -> Response:
        return await relay.handle(request, endpoint)
    return relayed
