"""Count requests refused before admission (bad key, model not allowed or absent, rate limit or
budget, store unavailable).

Those never reach the engine and emit no usage record, so the usage sinks do not see them; this
ASGI middleware counts them from the response status of the OpenAI routes, per tenant (the
principal the auth dependency put on the request state; ``unknown`` for a bad key).
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
                principal = state.get("principal")
                self.metrics.record_rejection(getattr(principal, "tenant", UNKNOWN_TENANT),
                                              message["status"])
            await send(message)

        await self.app(scope, receive, send_counting)
