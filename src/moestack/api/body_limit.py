"""ASGI middleware that answers 413 to bodies larger than the configured limit.

It checks ``Content-Length`` first and also counts the bytes actually received, so a chunked or
lying client cannot get a large body past it.
"""

from __future__ import annotations

from moestack.api.errors import moestack_error_response
from moestack.errors import RequestTooLargeError


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"Request body too large: the limit is {self.max_body_bytes} bytes.")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await moestack_error_response(self._too_large())(scope, receive, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await moestack_error_response(self._too_large())(scope, receive, send)
            body.append(message)
            more = message.get("more_body", False)

        async def replay():
            if body:
                return body.pop(0)
            return await receive()

        await self.app(scope, replay, send)
