"""Reject oversized credential headers before any work (ASGI middleware).

An ``Authorization`` or ``x-api-key`` header longer than :data:`MAX_CREDENTIAL_HEADER_BYTES`
(1 KiB; moestack keys are under 100 characters, JWTs from an auth proxy under 1 KiB) gets an
OpenAI-shaped 431 before routing, authentication, a key hash or a store lookup runs.

This middleware only sees a request once the HTTP server has parsed all its headers, so it does
not stop a huge header from being *read*: that is the server's job. uvicorn's ``h11`` protocol
stops at ``h11_max_incomplete_event_size`` (16 KiB by default) and closes the connection with a
400, reading no further; the ``httptools`` protocol (uvicorn's ``auto`` choice when httptools is
installed, as in Ray Serve's proxy) has no such limit. moestack's own listeners therefore run
``h11`` with :data:`MAX_HEADER_SECTION_BYTES` (see :mod:`moestack.serve.operator_listener`).
"""

from __future__ import annotations

import json

MAX_CREDENTIAL_HEADER_BYTES = 1024
# The whole header section an h11 server buffers before it gives up (uvicorn's default).
MAX_HEADER_SECTION_BYTES = 16 * 1024
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


class CredentialHeaderLimitMiddleware:
    """ASGI middleware: 431 for a credential header over ``max_bytes``."""

    def __init__(self, app, max_bytes: int = MAX_CREDENTIAL_HEADER_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if len(value) > self.max_bytes and name.lower() in CREDENTIAL_HEADERS:
                    await _reject(send, name.decode("latin-1"), self.max_bytes)
                    return
        await self.app(scope, receive, send)


async def _reject(send, header: str, max_bytes: int) -> None:
    body = json.dumps({"error": {
        "message": f"The {header} header is longer than {max_bytes} bytes.",
        "type": "invalid_request_error", "param": header, "code": "header_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 431,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
