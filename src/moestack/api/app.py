"""Build the OpenAI-compatible ASGI app over any :class:`ModelBackend`, and its request hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moestack.api.admin.routes import tenant_router
from moestack.api.backend import ModelBackend
from moestack.api.body_limit import BodyLimitMiddleware
from moestack.api.chain import build_hooks
from moestack.api.context import request_context
from moestack.api.endpoints import ENDPOINTS, Endpoint
from moestack.api.errors import install_error_handlers
from moestack.api.header_limit import HeaderLimitMiddleware
from moestack.api.models.routes import router as models_router
from moestack.api.overflow import Overflow
from moestack.api.readiness import ready_router
from moestack.api.relay import Relay
from moestack.config.schema import MoestackConfig
from moestack.hooks import RequestContext
from moestack.metering.hook import UsageSink
from moestack.metering.metrics import GatewayMetrics
from moestack.metering.rejections import RejectionMetrics
from moestack.scheduling import Scheduler
from moestack.tenancy import Tenancy
from moestack.tenancy.adapters import AdapterCatalog
from moestack.tenancy.overflow_budget import OverflowBudget

log = logging.getLogger(__name__)


def build_api(config: MoestackConfig, backend: ModelBackend, sinks: Sequence[UsageSink] = (),
              tenancy: Tenancy | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """The gateway's public HTTP app: the relayed API routes (:data:`ENDPOINTS`), /v1/models,
    /health, errors, body and header limits.

    With ``config.tenancy.enabled`` the OpenAI routes need a tenant key and run through
    ``tenancy`` (built from ``config.storage.url`` if not given) and the fair queue of
    ``scheduler`` (built from ``config`` if not given). The admin API and /metrics are not
    here: :func:`moestack.api.operator.build_operator_api` serves them on the operator listener
    over this app's ``state.metrics`` and ``state.tenancy``.
    """
    docs = config.gateway.docs_enabled  # /docs and /openapi.json reveal every route: opt-in
    app = FastAPI(title="moestack", version="0.1.0",
                  description="OpenAI-compatible API of moestack.",
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    metrics = GatewayMetrics(config=config)
    if config.tenancy.enabled:
        tenancy = tenancy or Tenancy.from_config(config)
        scheduler = scheduler or Scheduler(config)
        for m in config.models:
            queue = scheduler.queue(m.name)
            metrics.track_queue_depth(m.name, queue.waiting, lambda q=queue: q.max_inflight)
            metrics.track_fairness(m.name, lambda name=m.name: scheduler.fairness(name))
    else:
        tenancy = scheduler = None
    app.state.tenancy, app.state.scheduler = tenancy, scheduler
    overflow = (Overflow.from_config(config, metrics.cost_model, scheduler,
                                     OverflowBudget(tenancy.writer))
                if tenancy is not None and config.overflow.enabled else None)
    app.state.hooks = build_hooks(metrics, sinks, tenancy, scheduler, overflow)
    app.state.adapters = (AdapterCatalog(tenancy.store, config.tenancy.auth_cache_ttl_s)
                          if tenancy is not None else None)
    relay = Relay(config, backend, app.state.hooks, app.state.adapters)
    relay.migrator.on_migrated = metrics.record_migration
    relay.overflow = overflow
    app.state.config = config
    app.state.created = int(time.time())
    app.state.metrics = metrics
    app.state.relay = relay
    install_error_handlers(app)
    for endpoint in ENDPOINTS:
        app.add_api_route(endpoint.path, _route(relay, endpoint), methods=["POST"],
                          name=endpoint.name,
                          summary=f"{endpoint.path}, relayed to the model's engine")
    app.include_router(models_router)
    if tenancy is not None:  # the admin API is on the operator listener (moestack.api.operator)
        app.include_router(tenant_router)
    app.include_router(ready_router)

    logged_problems: dict[str, str] = {}

    @app.get("/health")
    async def health(request: Request):
        problems = {m: why for m, why in (await backend.check_health()).items() if why}
        if problems != logged_problems:  # the reasons (engine errors) go to the log only:
            log.warning("model health changed: %s", problems or "all healthy")  # it is public
            logged_problems.clear()
            logged_problems.update(problems)
        if problems:
            return JSONResponse({"status": "unhealthy",
                                 "models": dict.fromkeys(problems, "unavailable")},
                                status_code=503)
        return {"status": "ok"}

    app.add_middleware(RejectionMetrics, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.gateway.max_body_bytes)
    app.add_middleware(HeaderLimitMiddleware)
    return app


def _route(relay: Relay, endpoint: Endpoint):
    async def relayed(request: Request,
                      ctx: RequestContext = Depends(request_context)) -> Response:
        return await relay.handle(request, endpoint, ctx)
    return relayed
