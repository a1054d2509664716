"""The operator listener: each gateway replica serves the operator app on its own port.

Why a second listener, and why this shape:

- The admin API and ``/metrics`` must not share the public port. Ray Serve has one HTTP proxy
  port for every ingress, and whatever an ingress app mounts is reachable through it (and so
  through any Ingress or load balancer in front of it). A second Serve application on another
  route prefix would still be on the proxy port. So each Gateway replica runs one small uvicorn
  server of its own, serving :func:`moestack.api.operator.build_operator_api`, in the replica's
  event loop, sharing the replica's metrics and tenancy objects (no copy, no extra hop).
- One server per replica, not one per node: each replica keeps its own Prometheus registry
  (its share of the cluster cost, its requests), and Prometheus must scrape every replica's own
  numbers; a port that load-balances across replicas would show a different replica at each
  scrape and break every ``rate()``.
- Several replicas on one node: they would collide on one port. Each replica binds the first
  free port of ``gateway.operator_ports`` (``operator_port`` .. ``operator_port +
  operator_port_count - 1``, default one per replica); no ``SO_REUSEPORT``, so two replicas
  never share a port. A replica that finds every port taken (during a rollout the old replica
  still holds its port) retries every ``retry_interval_s`` until one frees, while the public
  API serves meanwhile. The Helm chart declares these ports on the head pod, where it pins the
  gateways, and scrapes each.
- The server runs :class:`~moestack.serve.http_limits.HeadBoundedHttpToolsProtocol`, so a request
  head over 16 KiB gets 431 and the connection is closed instead of the head being read whole
  (uvicorn's own ``httptools`` protocol has no limit; ``h11``'s answers 400, and only to a head
  split over several reads).
- No work at import time: :meth:`start` binds and starts serving, :meth:`stop` closes the
  socket at once (the port is free for a successor) and waits for the server to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

from moestack.serve.http_limits import HeadBoundedHttpToolsProtocol

log = logging.getLogger(__name__)


def bind_first_free(host: str, ports: range) -> socket.socket | None:
    """A listening TCP socket on the first port of ``ports`` nobody holds, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # SO_REUSEADDR only lets a restarted replica reuse a port in TIME_WAIT; on Linux it
        # does not let two live listeners share one.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        sock.setblocking(False)
        return sock
    return None


class OperatorListener:
    """Serves ``app`` on the first free port of ``ports`` at ``host``."""

    def __init__(self, app, host: str, ports: range, retry_interval_s: float = 1.0):
        self.app = app
        self.host = host
        self.ports = ports
        self.retry_interval_s = retry_interval_s
        self.port: int | None = None
        self._server = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}" if self.port is not None else None

    def start(self) -> None:
        """Start serving in the running event loop (idempotent). Binds at once when a port is
        free, so :attr:`port` is known on return; else keeps trying in the background."""
        if self._task is not None and not self._task.done():
            return
        sock = bind_first_free(self.host, self.ports)
        self._task = asyncio.get_running_loop().create_task(self._run(sock))

    async def wait_started(self) -> None:
        """Until the server accepts connections (for callers that need the URL)."""
        while self._server is None or not self._server.started:
            if self._task is None or self._task.done():
                raise RuntimeError("the operator listener is not running")
            await asyncio.sleep(0.01)

    async def _run(self, sock: socket.socket | None) -> None:
        import uvicorn

        if sock is None:
            log.warning("operator ports %d-%d on %s are all taken (a rollout, or more gateway "
                        "replicas on this node than gateway.operator_port_count); retrying "
                        "every %g s", self.ports.start, self.ports.stop - 1, self.host,
                        self.retry_interval_s)
        while sock is None:
            await asyncio.sleep(self.retry_interval_s)
            sock = bind_first_free(self.host, self.ports)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, http=HeadBoundedHttpToolsProtocol, lifespan="off",
                                access_log=False, log_config=None, log_level="warning",
                                timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        # The replica's own process handles signals; uvicorn must not take them over.
        self._server.capture_signals = contextlib.nullcontext
        log.info("operator listener (admin API, /metrics) on %s", self.url)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()

    def close(self) -> None:
        """Stop accepting connections now (frees the port) and ask the server to finish; safe
        from a synchronous ``__del__``."""
        if self._server is not None:
            self._server.should_exit = True
            for server in getattr(self._server, "servers", []):
                server.close()
        elif self._task is not None:
            self._task.cancel()  # still waiting for a port

    async def stop(self) -> None:
        """:meth:`close`, then wait until the server has finished."""
        self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._server = None
        self.port = None
