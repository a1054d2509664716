"""Header limits of the HTTP servers moestack runs or has Ray Serve run: 431 past 16 KiB.

uvicorn's ``httptools`` protocol (what uvicorn picks when httptools is installed, as Ray Serve's
proxy and direct-ingress servers do) reads a request head of any size into memory: an 8 MB
header reached Serve's proxy whole and came back as a 500. :class:`HeadBoundedHttpToolsProtocol`
counts the bytes of a head still incomplete after each read and, past
:data:`~moestack.api.header_limit.MAX_HEADER_SECTION_BYTES`, answers the OpenAI-shaped 431 and
closes the connection without reading further. A head that arrives whole in one read (at most
a socket read, 64 KiB) is answered by :class:`~moestack.api.header_limit.HeaderLimitMiddleware`.

Where it is used:

* the operator listener (:mod:`moestack.serve.operator_listener`) passes the class to uvicorn;
* Ray Serve's proxy and direct-ingress servers take no uvicorn options, but call the function
  named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in their process before they start, and
  apply the middlewares it returns: :func:`serve_http_middlewares` installs the protocol as
  uvicorn's ``auto`` choice there and returns the middleware. ``moestack up`` sets that variable
  (:data:`PROXY_CALLBACK_ENV`) before it starts Ray; the Helm chart sets it on every Ray pod.

A request pipelined behind a large body on one connection may be counted with that body's last
bytes; clients do not pipeline, and such a request is refused with the same 431, never mixed up.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from moestack.api.header_limit import MAX_HEADER_SECTION_BYTES, HeaderLimitMiddleware, body_431

PROXY_CALLBACK_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
        "moestack.serve.http_limits:serve_http_middlewares",
}
"""Ray Serve's environment that puts the header limits on its proxy and direct ingress."""

PROTOCOL_IMPORT_PATH = "moestack.serve.http_limits:HeadBoundedHttpToolsProtocol"


class HeadBoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that stops reading a request head past ``max_head_bytes``."""

    max_head_bytes = MAX_HEADER_SECTION_BYTES

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_pending = False
        self._head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_pending, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._head_pending = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_pending and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._head_pending = False
                self._send_431()

    def _send_431(self) -> None:
        body = body_431(None, self.max_head_bytes)
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def serve_http_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` target, called by Ray Serve in its proxy
    (and direct-ingress replica) process before its HTTP server starts: makes the bounded
    protocol uvicorn's ``auto`` choice in that process and returns the header middleware."""
    import uvicorn.config
    from starlette.middleware import Middleware

    uvicorn.config.HTTP_PROTOCOLS["auto"] = PROTOCOL_IMPORT_PATH
    return [Middleware(HeaderLimitMiddleware)]
