"""Gateway: the Ray Serve ingress deployment serving the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve.handle import DeploymentHandle

from moestack.api.app import build_api
from moestack.api.operator import build_operator_api
from moestack.config.schema import MoestackConfig
from moestack.routing.policy import ROUTERS
from moestack.serve.backend import ServeBackend
from moestack.serve.fair_board import FairBoardClient
from moestack.serve.operator_listener import OperatorListener
from moestack.serve.queue_board import REPORT_INTERVAL_S, BoardClient
from moestack.tenancy.gate import TenancyGate


class Gateway:
    async def __init__(self, config: dict[str, Any], model_handles: dict[str, DeploymentHandle]):
        from ray import serve

        self.config = MoestackConfig.model_validate(config)
        self.backend = ServeBackend(model_handles, {
            m.name: m.routing.max_attempts_before_first_token for m in self.config.models})
        # Every replica opens the shared store (migrating it if needed) at start, so a bad
        # storage URL fails the deployment instead of the first request.
        self.tenancy = TenancyGate.from_config(self.config) if self.config.tenancy.enabled \
            else None
        context = serve.get_replica_context()
        self.app_name, self.replica_id = context.app_name, context.replica_id.unique_id
        if self.tenancy is not None and self.config.gateway.num_replicas > 1:
            # Fair-queue counters shared by the gateway replicas (one replica: its own are all)
            self.tenancy.share_fairness({m.name: FairBoardClient(self.app_name, m.name)
                                         for m in self.config.models})
        self._follow = asyncio.get_running_loop().create_task(self._follow_models())

    def __serve_build_asgi_app__(self):
        app = build_api(self.config, self.backend, tenancy=self.tenancy)
        for m in self.config.models:
            app.state.metrics.track_routing(
                m.name, lambda name=m.name: self._router_counts(name),
                lambda name=m.name: self.backend.failovers[name])
        gw = self.config.gateway  # admin API and /metrics: this replica's own port, not public
        self.operator = OperatorListener(
            build_operator_api(self.config, app.state.metrics, self.tenancy),
            gw.operator_host, gw.operator_ports)
        self.operator.start()
        return app

    def _router_counts(self, model: str):
        router = ROUTERS.get((self.app_name, model))
        return router.counts if router is not None else None

    async def _follow_models(self) -> None:
        """Every ``REPORT_INTERVAL_S``: size each model's fair queue to its live replicas and
        report the requests waiting in it to the autoscaler's board."""
        if self.tenancy is None:
            return  # no fair queue: nothing waits here
        board = BoardClient(self.app_name, create=True)
        while True:
            for m in self.config.models:
                counts = self._router_counts(m.name)
                if counts is not None and counts.live_replicas is not None:
                    self.tenancy.follow_replicas(m.name, counts.live_replicas)
            await board.report(self.replica_id, self.tenancy.waiting())
            await asyncio.sleep(REPORT_INTERVAL_S)

    def __del__(self):
        if getattr(self, "operator", None) is not None:
            self.operator.close()
        if getattr(self, "_follow", None) is not None:
            self._follow.cancel()
        if getattr(self, "tenancy", None) is not None:
            self.tenancy.store.close()
