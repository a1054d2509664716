"""The direct-ingress listener answers KubeRay's Serve health check (GET /-/healthz on the head
pod's `serve` port) as Serve's proxy does: the Helm chart's public Service follows it."""

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from moestack.net import free_port
from moestack.serve.public_listener import PROXY_HEALTH_PATH, PublicListener


async def test_should_answer_serve_proxy_health_and_pass_every_other_path_to_the_app():
    async def who(_request):
        return PlainTextResponse("app")

    port = free_port()
    listener = PublicListener(Starlette(routes=[Route("/who", who)]), "127.0.0.1", port)
    listener.start()
    await listener.wait_started()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            health = await http.get(PROXY_HEALTH_PATH)
            assert (health.status_code, health.text) == (200, "success")
            assert (await http.get("/who")).text == "app"
            assert (await http.get("/-/routes")).status_code == 404  # the app's own answer
    finally:
        await listener.drain(1)
    assert PROXY_HEALTH_PATH == "/-/healthz"  # KubeRay's RayServeProxyHealthPath
