"""Request migration on a tiny real vLLM model (in-process): a stream whose engine fails
mid-answer is resumed from the token ids the client already has, and at temperature 0 the client
reads exactly the text of the same request run without a failure, on chat and completions, with
one usage record billing the prompt once and each completion token once.

The model is the tiny Mixtral in float32: the resumed request prefills what the original
decoded, and on tiny DeepSeek-V3 vLLM's MLA prefill and decode paths differ numerically enough to
flip the near-tied argmax of random weights (measured: the continuation differs after some
resumption points in bf16 and in f32), so exact equality is a property of the engine, not of the
migration; with standard attention in f32 prefill and decode agree.

The failure is injected below the layer under test: a backend that raises the error a dead
replica raises (:class:`EngineUnavailableError`) after a few chunks. The replica-kill probe on
Ray Serve is ``test_migration_replicas.py``."""

import json

import httpx
import pytest
import pytest_asyncio

from moestack.api.app import build_api
from moestack.api.backend import LocalBackend
from moestack.engine import build_engine
from moestack.errors import EngineUnavailableError
from moestack.loadtest.abuse import UsageRecorder
from moestack.testing import fake_config

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"
BASE = "http://moestack.test/v1"


class DyingBackend(LocalBackend):
    """Fails each request's first ``fail_after`` chunks later, as a killed replica would."""

    def __init__(self, engines, fail_after: int | None = None):
        super().__init__(engines)
        self.fail_after = fail_after
        self.requests: list[dict] = []

    async def serve(self, model, request):
        self.requests.append({"path": request.path, "body": json.loads(request.body)})
        fail = self.fail_after if "-resume" not in request.request_id else None
        stream = super().serve(model, request)
        n = 0
        try:
            async for chunk in stream:
                if fail is not None and n == fail:
                    raise EngineUnavailableError("the model replica failed: RayActorError")
                n += 1
                yield chunk
        finally:
            await stream.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    config = fake_config({
        "name": MODEL, "tiny": {"arch": "mixtral", "seed": 0},
        "architecture": "MixtralForCausalLM", "max_model_len": 512, "dtype": "float32",
        "engine_args": {"enforce_eager": True},
        "serving": {"stream_batch_interval_ms": 0, "stream_batch_max_interval_ms": 0}})
    engine = build_engine(config.models[0], config.cache_dir)
    await engine.start()
    yield config, {MODEL: engine}
    engine.stop()


async def run(config, backend, path, body, sink=None):
    """(events, record) of one streamed request through the gateway app."""
    app = build_api(config, backend, sinks=[sink] if sink else [])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=BASE, timeout=120) as http:
        async with http.stream("POST", path, json={"model": MODEL, **body}) as resp:
            assert resp.status_code == 200
            raw = b"".join([piece async for piece in resp.aiter_bytes()])
    lines = [ln[6:] for ln in raw.decode().split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", raw[-400:]
    return [json.loads(x) for x in lines[:-1]], app.state.relay.migrator


def text_of(events, chat):
    out = []
    for ev in events:
        for c in ev["choices"]:
            out.append((c["delta"].get("content") or "") if chat else c["text"])
    return "".join(out)


CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}
COMPLETION = {"prompt": "Once upon a time, by the sea,", "max_tokens": 64, "temperature": 0,
              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("path,body", [("/chat/completions", CHAT),
                                       ("/completions", COMPLETION)], ids=["chat", "completions"])
@pytest.mark.asyncio(loop_scope="module")
async def test_migrated_stream_text_equals_the_unfailed_text_at_temperature_0(engines, path,
                                                                             body):
    config, eng = engines
    chat = path == "/chat/completions"
    whole, _ = await run(config, LocalBackend(eng), path, body)
    sink = UsageRecorder()
    dying = DyingBackend(eng, fail_after=3)
    cut, migrator = await run(config, dying, path, body, sink)
    assert migrator.migrated[MODEL] == 1
    resumed = dying.requests[1]
    assert resumed["path"] == "/v1/completions" and len(resumed["body"]["prompt"]) > 0
    assert 0 < 64 - resumed["body"]["max_tokens"] < 64  # some tokens came before the failure
    assert text_of(cut, chat) == text_of(whole, chat)
    assert len(text_of(cut, chat)) > 0
    # One answer: its id, created and model throughout, one finish, the tenant's usage.
    assert len({(e["id"], e["created"], e["model"], e["object"]) for e in cut}) == 1
    assert cut[0]["object"] == whole[0]["object"]
    assert [c["finish_reason"] for e in cut for c in e["choices"]].count("length") == 1
    figures = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [cut[-1]["usage"][k] for k in figures] == [whole[-1]["usage"][k] for k in figures]
    assert cut[-1]["usage"]["completion_tokens"] == 64
    records = [r for rs in sink.snapshot().values() for r in rs]
    assert len(records) == 1 and records[0].status_code == 200
    assert (records[0].prompt_tokens, records[0].completion_tokens) == (
        whole[-1]["usage"]["prompt_tokens"], 64)


@pytest.mark.asyncio(loop_scope="module")
async def test_request_that_cannot_resume_ends_with_the_error_event(engines):
    config, eng = engines
    dying = DyingBackend(eng, fail_after=3)
    app = build_api(config, dying)
    body = {**CHAT, "model": MODEL, "n": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=BASE, timeout=120) as http:
        async with http.stream("POST", "/chat/completions", json=body) as resp:
            raw = b"".join([piece async for piece in resp.aiter_bytes()])
    assert b'"error"' in raw and b"[DONE]" not in raw
    assert app.state.relay.migrator.migrated[MODEL] == 0 and len(dying.requests) == 1
