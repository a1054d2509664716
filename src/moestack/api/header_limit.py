"""Bound request headers before any work (ASGI middleware): 431 past the limits.

Two limits, each answered with an OpenAI-shaped 431 before routing, authentication, a key hash
or a store lookup runs:

* the whole header section (request target plus every header line) over
  :data:`MAX_HEADER_SECTION_BYTES` (16 KiB, as common proxies and Node's HTTP server allow);
* an ``Authorization`` or ``x-api-key`` header over :data:`MAX_CREDENTIAL_HEADER_BYTES` (1 KiB;
  moestack keys are under 100 characters, JWTs from an auth proxy under 1 KiB).

This middleware only sees a request once the HTTP server has parsed all its headers, so on its
own it does not stop a huge header from being *read*: that is the server's job. moestack's
servers (the operator listener, and Ray Serve's proxy and direct-ingress servers through
:mod:`moestack.serve.http_limits`) run a protocol that stops reading a request head past the same
16 KiB and answers this 431 itself; the middleware covers a head that arrived whole in one read.
"""

from __future__ import annotations

import json

MAX_CREDENTIAL_HEADER_BYTES = 1024
MAX_HEADER_SECTION_BYTES = 16 * 1024
"""Largest request head accepted: the request target plus every ``name: value`` line."""
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
LINE_OVERHEAD_BYTES = 4
"""``: `` and CRLF of each header line."""


def head_bytes(scope: dict) -> int:
    """Bytes of a request's head as sent: its target and header lines (the request line's
    method and version are not counted)."""
    return (len(scope.get("raw_path") or scope.get("path", "").encode())
            + len(scope.get("query_string") or b"")
            + sum(len(n) + len(v) + LINE_OVERHEAD_BYTES for n, v in scope["headers"]))


class HeaderLimitMiddleware:
    """ASGI middleware: 431 for a header section over ``max_total_bytes`` or a credential
    header over ``max_credential_bytes``."""

    def __init__(self, app, max_total_bytes: int = MAX_HEADER_SECTION_BYTES,
                 max_credential_bytes: int = MAX_CREDENTIAL_HEADER_BYTES):
        self.app = app
        self.max_total_bytes = max_total_bytes
        self.max_credential_bytes = max_credential_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            if head_bytes(scope) > self.max_total_bytes:
                await send_431(send, None, self.max_total_bytes)
                return
            for name, value in scope["headers"]:
                if len(value) > self.max_credential_bytes and name.lower() in CREDENTIAL_HEADERS:
                    await send_431(send, name.decode("latin-1"), self.max_credential_bytes)
                    return
        await self.app(scope, receive, send)


def body_431(header: str | None, max_bytes: int) -> bytes:
    """The OpenAI-shaped body of a 431: for one header (``header``), or the whole section."""
    message = (f"The {header} header is longer than {max_bytes} bytes." if header else
               f"The request's headers are longer than {max_bytes} bytes in total.")
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": header, "code": "header_too_large"}}).encode()


async def send_431(send, header: str | None, max_bytes: int) -> None:
    body = body_431(header, max_bytes)
    await send({"type": "http.response.start", "status": 431,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
