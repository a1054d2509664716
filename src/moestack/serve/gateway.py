"""Gateway: the Ray Serve ingress deployment serving the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from moestack.api.app import build_api
from moestack.config.schema import MoestackConfig
from moestack.serve.backend import ServeBackend


class Gateway:
    def __init__(self, config: dict[str, Any], model_handles: dict[str, DeploymentHandle]):
        self.config = MoestackConfig.model_validate(config)
        self.backend = ServeBackend(model_handles)

    def __serve_build_asgi_app__(self):
        return build_api(self.config, self.backend)
