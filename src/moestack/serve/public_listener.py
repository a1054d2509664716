"""The public listener of direct ingress: every Gateway replica of a node serves the OpenAI API
on the same port (``gateway.port``), bound with ``SO_REUSEPORT``.

Why moestack binds the public port itself instead of Ray Serve's direct ingress:

- Ray Serve 2.60's direct ingress hands each ingress replica its own port from a pool
  (``RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT``) through the controller. A port released by a
  dead replica is quarantined for ``RAY_SERVE_PORT_QUARANTINE_S`` (150 s by default: it protects
  HAProxy workers that still route to the old port). With the pool as wide as the replicas, a
  SIGKILLed Gateway's successor got ``NoAvailablePortError`` until the quarantine ended: the
  public API was down 156-170 s.
- Setting the quarantine to 0 does not help: Ray binds the replica's port without
  ``SO_REUSEADDR``, so the successor's bind fails while the dead replica's connections sit in
  ``TIME_WAIT`` (60 s on Linux), and Ray then blocks that port for the rest of the cluster's life
  (measured: the API never came back). A wider pool gives the successor another port, which is
  not the address clients use.
- With several replicas, one port per replica is not one address either: clients of the dead
  replica's port get connection errors while the others serve on ports nobody is told about.

So with ``gateway.ingress: direct`` moestack turns Ray's direct ingress off and each Gateway
replica serves its ASGI app on ``gateway.port`` with uvicorn in the replica's event loop (what
Ray's direct ingress does, minus the port pool), on a socket with ``SO_REUSEADDR`` (a successor
binds at once, ``TIME_WAIT`` or not) and ``SO_REUSEPORT`` (every replica of the node listens on
the one port and the kernel spreads new connections over the live listeners; a dead replica's
socket leaves the group when its process dies, so the others take every new connection at once,
as Ray's own proxies do with ``SO_REUSEPORT``). Linux only lets processes of the same user join
a ``SO_REUSEPORT`` group; a port held by anything else fails the replica's start with
``EADDRINUSE``, naming the port.

The listener also answers ``GET /-/healthz`` as Serve's proxy does (``success``; 503 while it
drains): KubeRay polls that path on the head pod's ``serve`` port to decide whether the head is
in the RayService's public Service (label ``ray.io/serve``), which the Helm chart relies on.

Stopping (rollout, scale-down, ``moestack up`` stopping): :meth:`PublicListener.drain` stops
accepting at once (the node's other replicas take the new connections) and lets running
requests finish for up to its timeout, then closes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from moestack.serve.http_limits import HeadBoundedHttpToolsProtocol

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 90
"""Idle keep-alive of client connections (Ray Serve's default for its HTTP servers)."""
BACKLOG = 2048
PROXY_HEALTH_PATH = "/-/healthz"
"""Serve's proxy health path, which KubeRay checks on the head pod's ``serve`` port."""


def bind_shared(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other replicas (same user) may share."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"the Gateway cannot listen on {host}:{port} (gateway.port): "
                                 f"{exc.strerror}") from exc
    sock.setblocking(False)
    return sock


class PublicListener:
    """Serves ``app`` on ``host:port`` (shared with the node's other Gateway replicas)."""

    def __init__(self, app, host: str, port: int, keep_alive_s: float = KEEP_ALIVE_S):
        self.app, self.host, self.port, self.keep_alive_s = app, host, port, keep_alive_s
        self._server = None
        self._task: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        """Whether the server runs (False once it exited or was never started)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Bind now (raising ``OSError`` if the port is taken by another user's or a plain
        listener) and serve in the running event loop."""
        import uvicorn

        sock = bind_shared(self.host, self.port)
        config = uvicorn.Config(self._asgi, interface="asgi3",
                                http=HeadBoundedHttpToolsProtocol, lifespan="off",
                                access_log=False, log_config=None, log_level="warning",
                                timeout_keep_alive=self.keep_alive_s, backlog=BACKLOG)
        self._server = uvicorn.Server(config)
        # The replica's own process handles signals; uvicorn must not take them over.
        self._server.capture_signals = contextlib.nullcontext
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))
        log.info("public API on http://%s:%d (SO_REUSEPORT)", self.host, self.port)

    async def _asgi(self, scope, receive, send) -> None:
        """``app``, plus Serve's proxy health answer at :data:`PROXY_HEALTH_PATH`."""
        if scope["type"] != "http" or scope["path"] != PROXY_HEALTH_PATH:
            return await self.app(scope, receive, send)
        draining = self._server is None or self._server.should_exit
        status, body = (503, b"This node is being drained.") if draining else (200, b"success")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()

    async def wait_started(self) -> None:
        while self._server is None or not self._server.started:
            if not self.serving:
                raise RuntimeError("the public listener is not running")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop accepting new connections now (the port stays with the other replicas); the
        server then finishes its running requests. Safe from a synchronous ``__del__``."""
        if self._server is None:
            return
        self._server.should_exit = True
        for server in getattr(self._server, "servers", []):
            server.close()

    async def drain(self, timeout_s: float) -> None:
        """:meth:`close`, then wait up to ``timeout_s`` for running requests to finish; past it
        they are cancelled (their clients see the connection close)."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = timeout_s
        self.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s + 1.0)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
