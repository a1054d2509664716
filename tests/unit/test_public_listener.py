"""The direct-ingress public listener: every Gateway replica of a node on one port
(SO_REUSEPORT), a successor binding at once, a graceful drain. Real sockets on 127.0.0.1."""

import asyncio
import errno
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from moestack.net import free_port
from moestack.serve.public_listener import PublicListener, bind_shared


def app_named(name: str, chunks: int = 5, interval_s: float = 0.1) -> Starlette:
    async def who(_request):
        return PlainTextResponse(name)

    async def stream(_request):
        async def body():
            for i in range(chunks):
                yield f"{name}-{i}\n"
                await asyncio.sleep(interval_s)
        return StreamingResponse(body())

    return Starlette(routes=[Route("/who", who), Route("/stream", stream)])


async def start(name: str, port: int, **app_options) -> PublicListener:
    listener = PublicListener(app_named(name, **app_options), "127.0.0.1", port)
    listener.start()
    await listener.wait_started()
    return listener


async def who(port: int, http: httpx.AsyncClient | None = None) -> str:
    """The name of the listener a new connection reaches."""
    if http is None:
        async with fresh_connections() as http:
            return await who(port, http)
    return (await http.get(f"http://127.0.0.1:{port}/who")).text


def fresh_connections() -> httpx.AsyncClient:
    """A client that opens a new connection for every request."""
    return httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))


async def test_replicas_share_the_port_and_the_survivor_takes_every_new_connection():
    port = free_port()
    a, b = await start("a", port), await start("b", port)
    try:
        async with fresh_connections() as http:
            seen = {await who(port, http) for _ in range(60)}
            assert seen == {"a", "b"}  # the kernel spreads connections over both
            a.close()  # a replica's socket leaves the group (as when its process dies)
            assert {await who(port, http) for _ in range(30)} == {"b"}
    finally:
        await a.drain(1)
        await b.drain(1)


async def test_a_successor_binds_at_once_while_the_dead_ones_connections_are_in_time_wait():
    port = free_port()
    first = await start("first", port)
    async with httpx.AsyncClient(timeout=5) as http:  # the server closes first: TIME_WAIT
        resp = await http.get(f"http://127.0.0.1:{port}/who", headers={"Connection": "close"})
        assert resp.text == "first"
    await first.drain(1)
    plain = socket.socket()
    with pytest.raises(OSError) as refused:  # how Ray 2.60's direct ingress binds
        plain.bind(("127.0.0.1", port))
    plain.close()
    assert refused.value.errno == errno.EADDRINUSE
    successor = await start("successor", port)
    try:
        assert await who(port) == "successor"
    finally:
        await successor.drain(1)


def test_a_port_held_by_another_listener_fails_the_start_naming_the_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port} \\(gateway.port\\)"):
            bind_shared("127.0.0.1", port)
    finally:
        holder.close()


async def test_drain_finishes_running_streams_and_takes_no_new_connection():
    port = free_port()
    listener = await start("old", port, chunks=6, interval_s=0.1)
    async with httpx.AsyncClient(timeout=5) as http:
        async with http.stream("GET", f"http://127.0.0.1:{port}/stream") as resp:
            body = resp.aiter_lines()
            lines = [await anext(body)]
            drain = asyncio.create_task(listener.drain(5))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.ConnectError):  # no listener left on this port
                await who(port)
            lines += [line async for line in body]
    await drain
    assert lines == [f"old-{i}" for i in range(6)]
    assert not listener.serving


async def test_drain_cuts_what_outlives_its_timeout():
    port = free_port()
    listener = await start("slow", port, chunks=100, interval_s=0.1)
    async with httpx.AsyncClient(timeout=5) as http:
        async with http.stream("GET", f"http://127.0.0.1:{port}/stream") as resp:
            body = resp.aiter_lines()
            await anext(body)
            await asyncio.wait_for(listener.drain(0.3), 3)
            with pytest.raises(httpx.HTTPError):  # the stream ends with a connection error
                async for _ in body:
                    pass
    assert not listener.serving


@pytest.mark.parametrize("ingress", ["direct", "proxy"])
def test_gateway_replicas_share_one_public_port_beside_the_operator_ports(ingress):
    from moestack.config.schema import GatewayConfig

    gw = GatewayConfig(ingress=ingress, port=8000, num_replicas=3, operator_port=8001)
    assert gw.public_ports == range(8000, 8001)
    assert gw.operator_ports == range(8001, 8004)
    with pytest.raises(ValueError, match="overlap the public API"):
        GatewayConfig(ingress=ingress, port=8002, num_replicas=3, operator_port=8001)
