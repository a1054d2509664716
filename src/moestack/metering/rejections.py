"""Count requests refused before admission (bad key, model not allowed or absent, rate limit or
budget, store unavailable).

Those never reach the engine and emit no usage record, so the metering hook does not see them;
this ASGI middleware counts them from the response status of the OpenAI routes, per tenant (the
principal of the request context that the routes' dependency left on the request state,
:mod:`moestack.api.context`; ``unknown`` for a bad key).
"""

from __future__ import annotations

from moestack.metering.metrics import GatewayMetrics

REJECTION_STATUSES = frozenset({401, 403, 404, 429, 503})
UNKNOWN_TENANT = "unknown"


class RejectionMetrics:
    def __init__(self, app, metrics: GatewayMetrics, path_prefix: str = "/v1/"):
        self.app = app
        self.metrics = metrics
        self.path_prefix = path_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.path_prefix):
            return await self.app(scope, receive, send)

        state = scope.setdefault("state", {})  # shared with the request.state routes write

        async def send_counting(message):
            if (message["type"] == "http.response.start"
                    and message["status"] in REJECTION_STATUSES):
                context = state.get("context")
                tenant = context.tenant if context is not None else None
                self.metrics.record_rejection(tenant or UNKNOWN_TENANT, message["status"])
            await send(message)

        await self.app(scope, receive, send_counting)
