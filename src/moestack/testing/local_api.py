"""The gateway's ASGI app over in-process fake engines, reachable with the official client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from moestack.api.app import build_api
from moestack.api.backend import LocalBackend
from moestack.api.operator import build_operator_api
from moestack.config import MoestackConfig
from moestack.engine import build_engine
from moestack.engine.protocol import Engine
from moestack.scheduling import Scheduler
from moestack.tenancy import Tenancy

BASE_URL = "http://moestack.test"


@dataclass
class LocalStack:
    app: FastAPI
    engines: dict[str, Engine]
    http: httpx.AsyncClient
    tenancy: Tenancy | None = None
    """The tenancy layer when ``config.tenancy.enabled`` (its ``store`` creates tenants)."""
    operator: httpx.AsyncClient | None = None
    """The operator app (admin API, /metrics) over the same metrics and tenancy, in-process."""
    scheduler: Scheduler | None = None
    """The fair queues when ``config.tenancy.enabled``."""

    def openai(self, api_key: str = "unused", **kwargs):
        """An ``openai.AsyncOpenAI`` client talking to this app in-process."""
        import openai

        return openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key=api_key,
                                  http_client=self.http, max_retries=0, **kwargs)


@asynccontextmanager
async def local_stack(config: MoestackConfig, sinks=()) -> AsyncIterator[LocalStack]:
    """Start one engine per model in this process and serve the API over ASGI."""
    engines = {m.name: build_engine(m, config.cache_dir) for m in config.models}
    for engine in engines.values():
        await engine.start()
    backend = LocalBackend(engines)
    app = build_api(config, backend, sinks)
    tenancy, scheduler = app.state.tenancy, app.state.scheduler
    transport = httpx.ASGITransport(app=app)
    operator_app = build_operator_api(config, app.state.metrics, tenancy, backend)
    try:
        if tenancy is not None:
            tenancy.start()
            scheduler.start()
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=operator_app),
                                  base_url=BASE_URL) as operator:
            yield LocalStack(app, engines, http, tenancy, operator, scheduler)
    finally:
        if scheduler is not None:
            await scheduler.stop()
        if tenancy is not None:
            await tenancy.stop()
            tenancy.store.close()
        for engine in engines.values():
            engine.stop()
