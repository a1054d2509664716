"""Which media URLs a vLLM replica fetches for multimodal requests (request forgery guard).

vLLM fetches `image_url` / `audio_url` / `video_url` from any host when its
`allowed_media_domains` is empty; moestack's default refuses every remote URL instead. Checked
with vLLM's own media connector against a real local HTTP server.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from moestack.config.schema import ModelConfig
from moestack.engine.vllm_engine import NO_REMOTE_MEDIA, engine_args_for


def model(**serving) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "path": "/ckpt", "serving": serving})


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2, 2), (255, 0, 0)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def media_server():
    """A real HTTP server on 127.0.0.1 serving a PNG; yields (base URL, paths requested)."""
    requested: list[str] = []
    body = png()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def connector(config: ModelConfig):
    from vllm.multimodal.media import MediaConnector

    args = engine_args_for(config, Path("/ckpt"))
    return MediaConnector(allowed_media_domains=args["allowed_media_domains"])


def test_should_refuse_every_remote_media_url_when_no_media_domain_is_allowed(media_server):
    from vllm.multimodal.media.image import ImageMediaIO

    base, requested = media_server
    refuse = connector(model())
    for url in (f"{base}/cat.png", "http://169.254.169.254/latest/meta-data/",
                "https://moestack-postgresql:5432/"):
        with pytest.raises(ValueError, match="allowed domains"):
            refuse.load_from_url(url, ImageMediaIO())
    assert requested == []  # refused before any connection
    # Inline images still work.
    import base64

    inline = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert refuse.load_from_url(inline, ImageMediaIO()).size == (2, 2)


def test_should_fetch_media_from_listed_hosts_only_when_allowed_media_domains_is_set(media_server):
    from vllm.multimodal.media.image import ImageMediaIO

    base, requested = media_server
    allow = connector(model(allowed_media_domains=["127.0.0.1"]))
    assert allow.load_from_url(f"{base}/cat.png", ImageMediaIO()).size == (2, 2)
    assert requested == ["/cat.png"]
    with pytest.raises(ValueError, match="allowed domains"):
        allow.load_from_url(f"http://localhost:{base.rsplit(':', 1)[1]}/cat.png", ImageMediaIO())
    assert requested == ["/cat.png"]


def test_engine_args_carry_the_media_domains_to_vllm_and_the_escape_hatch_applies_last():
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert engine_args_for(model(), Path("/ckpt"))["allowed_media_domains"] == [NO_REMOTE_MEDIA]
    assert NO_REMOTE_MEDIA.endswith(".invalid")  # a name that never resolves (RFC 6761)
    listed = engine_args_for(model(allowed_media_domains=["img.example.com"]), Path("/ckpt"))
    engine_args = dataclasses.replace(AsyncEngineArgs(), **{
        "allowed_media_domains": listed["allowed_media_domains"]})
    assert engine_args.allowed_media_domains == ["img.example.com"]
    hatch = ModelConfig.model_validate({"name": "m", "path": "/ckpt",
                                        "engine_args": {"allowed_media_domains": None}})
    assert engine_args_for(hatch, Path("/ckpt"))["allowed_media_domains"] is None
