"""Build the OpenAI-compatible ASGI app over any :class:`ModelBackend`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from moestack.api.backend import ModelBackend
from moestack.api.body_limit import BodyLimitMiddleware
from moestack.api.chat.routes import router as chat_router
from moestack.api.chat.serving import ChatServing
from moestack.api.completions.routes import router as completions_router
from moestack.api.completions.serving import CompletionServing
from moestack.api.errors import install_error_handlers
from moestack.api.generation import GenerationService, UsageSink
from moestack.api.models.routes import router as models_router
from moestack.config.schema import MoestackConfig
from moestack.metering.metrics import GatewayMetrics
from moestack.metering.rejections import RejectionMetrics
from moestack.tenancy.admin_routes import admin_router, tenant_router
from moestack.tenancy.gate import TenancyGate, require_tenant


def build_api(config: MoestackConfig, backend: ModelBackend,
              sinks: Sequence[UsageSink] = (), tenancy: TenancyGate | None = None) -> FastAPI:
    """The gateway's HTTP app: OpenAI routes, /health, /metrics, errors, body limit.

    With ``config.tenancy.enabled`` the OpenAI routes need a tenant key and run through
    ``tenancy`` (built from ``config.storage.url`` if not given); the admin API is mounted too.
    """
    app = FastAPI(title="moestack", version="0.1.0",
                  description="OpenAI-compatible API of moestack.")
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
    service = GenerationService(config, backend, [metrics, *sinks], admission=app.state.tenancy)
    app.state.config = config
    app.state.created = int(time.time())
    app.state.metrics = metrics
    app.state.service = service
    app.state.chat = ChatServing(service)
    app.state.completions = CompletionServing(service)
    install_error_handlers(app)
    auth = [Depends(require_tenant)] if app.state.tenancy else []
    app.include_router(chat_router, dependencies=auth)
    app.include_router(completions_router, dependencies=auth)
    app.include_router(models_router, dependencies=auth)
    if app.state.tenancy:
        app.include_router(admin_router)
        app.include_router(tenant_router)

    @app.get("/health")
    async def health(request: Request):
        problems = {m: why for m, why in (await backend.check_health()).items() if why}
        if problems:
            return JSONResponse({"status": "unhealthy", "models": problems}, status_code=503)
        return {"status": "ok"}

    if config.monitoring.metrics_enabled:
        @app.get("/metrics")
        async def metrics_endpoint():
            return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RejectionMetrics, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.gateway.max_body_bytes)
    return app
