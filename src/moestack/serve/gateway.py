"""Gateway: the Ray Serve ingress deployment serving the OpenAI-compatible API.

Each replica composes the request path of :mod:`moestack.api.app` (its hooks: tenancy's
authentication and admission, the fair queue of its :class:`~moestack.scheduling.Scheduler`,
metering) with what only Ray gives: its counters shared with the other gateway replicas
(:mod:`moestack.scheduling.shared_counters`), its queue sized to the model's live replicas and
its waiting requests reported to the autoscaler (:mod:`moestack.scheduling.queue_depth`).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray.serve.handle import DeploymentHandle

from moestack.api.app import build_api
from moestack.api.operator import build_operator_api
from moestack.config.schema import MoestackConfig
from moestack.errors import ConfigError
from moestack.routing.router import ROUTERS
from moestack.scheduling import Scheduler
from moestack.scheduling.queue_depth import REPORT_INTERVAL_S, QueueDepthClient
from moestack.scheduling.shared_counters import SharedCountersClient
from moestack.serve.backend import ServeBackend
from moestack.serve.operator_listener import OperatorListener
from moestack.serve.public_listener import PublicListener
from moestack.tenancy import Tenancy

HEALTH_CHECK_PERIOD_S = 1.0
"""How often Serve checks a Gateway replica. Serve notices a dead replica (SIGKILL, OOM) only
through a failed check, so this bounds how long the public API waits before the replacement
starts (Serve's default, 10 s, would make up most of the outage); a check is one small call."""

DRAIN_TIMEOUT_S = 15.0
"""Longest a stopping Gateway replica lets its running requests finish on the direct-ingress
listener (inside Serve's default ``graceful_shutdown_timeout_s`` of 20 s, past which Serve kills
the replica); with Serve's proxy, Serve drains them itself before :meth:`Gateway.__del__`."""


class Gateway:
    async def __init__(self, config: dict[str, Any], model_handles: dict[str, DeploymentHandle]):
        from ray import serve

        self.config = replica_config(config)
        self.backend = ServeBackend(serve_transport(model_handles), {
            m.name: m.routing.max_attempts_before_first_token for m in self.config.models})
        # Every replica opens the shared store (migrating it if needed) at start, so a bad
        # storage URL fails the deployment instead of the first request.
        enabled = self.config.tenancy.enabled
        self.tenancy = Tenancy.from_config(self.config) if enabled else None
        self.scheduler = Scheduler(self.config) if enabled else None
        context = serve.get_replica_context()
        self.app_name, self.replica_id = context.app_name, context.replica_id.unique_id
        self.public: PublicListener | None = None
        if self.scheduler is not None and self.config.gateway.num_replicas > 1:
            # Fair-queue counters shared by the gateway replicas (one replica: its own are all)
            self.scheduler.share_counters({m.name: SharedCountersClient(self.app_name, m.name)
                                           for m in self.config.models})
            self.scheduler.start()
        if self.tenancy is not None:
            # The beat from the start, not from the first request: it also closes the rows of
            # any dead gateway whose lease ran out (a replica this one replaces, say).
            self.tenancy.start()
        self._follow = asyncio.get_running_loop().create_task(self._follow_models())

    def __serve_build_asgi_app__(self):
        app = build_api(self.config, self.backend, tenancy=self.tenancy,
                        scheduler=self.scheduler)
        for m in self.config.models:
            app.state.metrics.track_routing(
                m.name, lambda name=m.name: self._router_counts(name),
                lambda name=m.name: self.backend.failovers[name])
        gw = self.config.gateway  # admin API and /metrics: this replica's own port, not public
        self.operator = OperatorListener(
            build_operator_api(self.config, app.state.metrics, self.tenancy, self.backend),
            gw.operator_host, gw.operator_ports)
        self.operator.start()
        self.overflow = app.state.relay.overflow
        if gw.ingress == "direct":  # the public port, shared by the node's gateway replicas
            self.public = PublicListener(app, gw.host, gw.port)
            self.public.start()
        return app

    async def check_health(self) -> None:
        """Serve's health check: a replica whose public listener stopped is replaced."""
        if self.public is not None and not self.public.serving:
            raise RuntimeError("the public listener (direct ingress) is not serving")

    def _router_counts(self, model: str):
        router = ROUTERS.get((self.app_name, model))
        return router.counts if router is not None else None

    async def _follow_models(self) -> None:
        """Every ``REPORT_INTERVAL_S``: size each model's fair queue to its live replicas and
        report the requests waiting in it to the autoscaler's queue-depth board."""
        if self.scheduler is None:
            return  # no fair queue: nothing waits here
        queue_depth = QueueDepthClient(self.app_name, create=True)
        while True:
            for m in self.config.models:
                counts = self._router_counts(m.name)
                if counts is not None and counts.live_replicas is not None:
                    self.scheduler.follow_replicas(m.name, counts.live_replicas)
            await queue_depth.report(self.replica_id, self.scheduler.waiting())
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self):
        """Serve's graceful stop (Serve awaits an async ``__del__``): stop taking connections,
        let running requests finish (direct ingress; Serve's proxy drains before this), write
        their settlements, close the store."""
        if getattr(self, "public", None) is not None:
            await self.public.drain(DRAIN_TIMEOUT_S)
        if getattr(self, "operator", None) is not None:
            self.operator.close()
        if getattr(self, "_follow", None) is not None:
            self._follow.cancel()
        if getattr(self, "overflow", None) is not None:  # the providers' connections
            await self.overflow.aclose()
        if getattr(self, "scheduler", None) is not None:
            await self.scheduler.stop()
        if getattr(self, "tenancy", None) is not None:
            await self.tenancy.stop()
            self.tenancy.store.close()


def serve_transport(handles: dict[str, DeploymentHandle]) -> dict[str, DeploymentHandle]:
    """``handles``, sending their calls over the transport Serve's settings in this process ask
    for (``RAY_SERVE_USE_GRPC_BY_DEFAULT``: gRPC between replicas, else Ray's actor tasks).

    A handle carries the transport of the process that made it. ``moestack up``'s driver
    imports Ray Serve before it sets :data:`moestack.serve.runner.THROUGHPUT_ENV`, so the
    handles this replica gets as arguments would send every model call as an actor task with
    a streamed object per item: about 1.5 ms more CPU per request across the Gateway and
    ModelServer replicas than Serve's gRPC (``benchmarks/gateway_capacity.py``). The replica
    applies its own process's setting, whichever process made the handle.
    """
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    return {m: h.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)
            for m, h in handles.items()}


def replica_config(config: dict[str, Any]) -> MoestackConfig:
    """The Gateway's config from its argument, with the secrets its builder kept out of it
    (:func:`moestack.serve.app.gateway_config`) read from this process's environment."""
    parsed = MoestackConfig.model_validate(config)
    env = parsed.storage.url_env
    if env is None:
        return parsed
    url = os.environ.get(env)
    if not url:
        raise ConfigError(f"storage.url_env names the environment variable {env}, which is not "
                          "set in this Gateway replica's process (set it on every node that "
                          "runs a Gateway)")
    return parsed.model_copy(update={"storage": parsed.storage.model_copy(
        update={"url": url, "url_env": None})})
