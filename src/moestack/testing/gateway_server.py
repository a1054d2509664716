"""Serve moestack's gateway app over real HTTP (uvicorn on 127.0.0.1), without Ray: in a
background thread (:func:`serve_gateway`) or as a process
(``python -m moestack.testing.gateway_server``).

The reliability suite, load-generator tests and gateway benchmarks need real sockets: streamed
timing, client disconnects and slow clients cannot be observed through an in-memory ASGI
transport (which buffers whole responses; :mod:`moestack.testing.local_api` is that one). The
app is the same one the Ray Serve Gateway deployment serves, built by
:func:`moestack.api.app.build_api` over in-process engines (the fake engine).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from moestack.config.schema import MoestackConfig
from moestack.net import free_port


@dataclass
class LocalServer:
    """A running server; ``base_url`` ends in ``/v1``."""

    app: object
    engines: dict
    port: int
    server: object
    operator_port: int

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def operator_url(self) -> str:
        """The operator listener: admin API and /metrics."""
        return f"http://127.0.0.1:{self.operator_port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def open_connections(self) -> int:
        """HTTP connections the server holds open now."""
        return len(self.server.server_state.connections)

    def running_tasks(self) -> int:
        """Request tasks the server is running now."""
        return len(self.server.server_state.tasks)


def build_gateway(config: MoestackConfig, sinks: Sequence = ()):
    """The gateway app for ``config`` and its (not yet started) in-process engines."""
    from moestack.api.app import build_api
    from moestack.api.backend import LocalBackend
    from moestack.engine import build_engine

    engines = {m.name: build_engine(m, config.cache_dir) for m in config.models}
    return build_api(config, LocalBackend(engines), sinks), engines


def _uvicorn(app, port: int, **options):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="off", **options))


async def _serve(server, app, engines: dict, operator_port: int | None = None) -> None:
    from moestack.api.operator import build_operator_api
    from moestack.serve.operator_listener import OperatorListener

    for engine in engines.values():
        await engine.start()
    operator = None
    if operator_port is not None:  # as each Gateway replica does
        operator = OperatorListener(
            build_operator_api(app.state.config, app.state.metrics, app.state.tenancy,
                               app.state.relay.backend),
            "127.0.0.1", range(operator_port, operator_port + 1))
        operator.start()
    try:
        await server.serve()
    finally:
        if operator is not None:
            await operator.stop()
        if getattr(app.state, "tenancy", None) is not None:
            await app.state.tenancy.stop()
        for engine in engines.values():
            engine.stop()


@contextmanager
def serve_gateway(config: MoestackConfig, sinks: Sequence = (),
                  timeout_keep_alive_s: float = 5.0, **uvicorn_options) -> Iterator[LocalServer]:
    """Start the gateway app for ``config`` (fake-engine models) and stop it on exit; ``sinks``
    receive every request's usage record, as the ledger does."""
    app, engines = build_gateway(config, sinks)
    port, operator_port = free_port(), free_port()
    server = _uvicorn(app, port, timeout_keep_alive=timeout_keep_alive_s, **uvicorn_options)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_serve(server, app, engines, operator_port))
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="moestack-gateway-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the local gateway did not start: {failure}")
        thread.join(0.02)
    try:
        yield LocalServer(app, engines, port, server, operator_port)
    finally:
        server.should_exit = True
        thread.join(10)


def main(argv: list[str] | None = None) -> int:
    """``python -m moestack.testing.gateway_server``: the gateway app in one process (no Ray),
    over fake engines, for benchmarks and crash tests."""
    import argparse

    from moestack.config import load_config
    from moestack.testing.configs import fake_config, fake_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--operator-port", type=int, help="port of the admin API and /metrics "
                   "(default: none)")
    p.add_argument("--config", help="moestack config YAML (default: one fake model, no tenancy)")
    p.add_argument("--model", default="fake-moe", help="fake model name (without --config)")
    p.add_argument("--ttft-s", type=float, default=0.0, help="fake engine TTFT (no --config)")
    p.add_argument("--token-interval-s", type=float, default=0.0,
                   help="fake engine token interval (without --config)")
    p.add_argument("--engines-down", action="store_true", help="every engine unhealthy: no "
                   "replica takes a request (what overflow and failover see)")
    args = p.parse_args(argv)
    if args.config:
        config = load_config(args.config)
    else:
        config = fake_config(fake_model(args.model, max_model_len=1 << 16,
                                        fake={"ttft_s": args.ttft_s,
                                              "token_interval_s": args.token_interval_s}))
    app, engines = build_gateway(config)
    for engine in engines.values():
        engine.healthy = not args.engines_down
    server = _uvicorn(app, args.port)
    asyncio.run(_serve(server, app, engines, args.operator_port))  # stops on SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
