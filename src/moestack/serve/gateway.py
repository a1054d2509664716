"""Gateway: the Ray Serve ingress deployment serving the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from moestack.api.app import build_api
from moestack.config.schema import MoestackConfig
from moestack.serve.backend import ServeBackend
from moestack.tenancy.gate import TenancyGate


class Gateway:
    def __init__(self, config: dict[str, Any], model_handles: dict[str, DeploymentHandle]):
        self.config = MoestackConfig.model_validate(config)
        self.backend = ServeBackend(model_handles, {
            m.name: m.routing.max_attempts_before_first_token for m in self.config.models})
        # Every replica opens the shared store (migrating it if needed) at start, so a bad
        # storage URL fails the deployment instead of the first request.
        self.tenancy = TenancyGate.from_config(self.config) if self.config.tenancy.enabled \
            else None

    def __serve_build_asgi_app__(self):
        return build_api(self.config, self.backend, tenancy=self.tenancy)

    def __del__(self):
        if getattr(self, "tenancy", None) is not None:
            self.tenancy.store.close()
