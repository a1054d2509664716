"""The real local stack (`moestack up`: Ray Serve + vLLM on a tiny model), driven with the
official `openai` client. One stack per module; the last test stops it.

The tiny model is the embedded default's (``deploy/local.yaml``) unless ``MOESTACK_TEST_TINY_ARCH``
names another tiny architecture (``deepseek-v4``, ``mixtral``): the same suite then runs on that
model.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest

from moestack.vllm_cpu.libraries import unsupported_reason
from moestack.testing.configs import default_tiny_arch, tiny_model
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

pytestmark = pytest.mark.integration

ARCH = default_tiny_arch()
MODEL = f"tiny-{ARCH}"


@pytest.fixture(scope="module")
def stack():
    if reason := unsupported_reason(ARCH.replace("-", "_")):
        pytest.skip(reason)
    shm_before = set(os.listdir("/dev/shm"))
    tmp = short_temp_dir()
    config = {
        "models": [tiny_model(
            ARCH, max_model_len=512,
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
            engine_args={"enforce_eager": True})],
        "gateway": {"host": "127.0.0.1", "port": free_port(), "max_body_bytes": 65536,
                    "first_token_timeout_s": 120},
        "storage": {"url": f"sqlite:///{tmp / 'moestack.db'}"},
        "tenancy": {"enabled": True, "bootstrap_tenant": "default"},
        "ray": {"num_cpus": 2},
    }
    s = start_stack(config, tmp)
    s.shm_before = shm_before
    yield s
    if s.proc.poll() is None:
        s.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def key(stack):
    key = stack.bootstrap_key()
    assert key, "the banner printed no API key for the bootstrap tenant"
    return key


@pytest.fixture
def client(stack, key):
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_banner_shows_ready_to_paste_curl_and_openai_examples(stack, key):
    text = stack.text()
    assert "curl http://127.0.0.1:" in text and "/v1/chat/completions" in text
    assert f"Bearer {key}" in text and "from openai import OpenAI" in text
    assert f"operator (/admin/v1, /metrics; not public): {stack.operator_url}" in text


def test_admin_api_and_metrics_answer_on_the_operator_port_only(stack):
    root = stack.base_url.removesuffix("/v1")
    for path in ("/metrics", "/admin/v1/tenants", "/docs", "/openapi.json"):
        assert httpx.get(f"{root}{path}", timeout=30).status_code == 404, path
    assert httpx.get(f"{stack.operator_url}/metrics", timeout=30).status_code == 200
    # No admin key in this stack's environment: the admin API is there, and refuses.
    r = httpx.get(f"{stack.operator_url}/admin/v1/tenants", timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_requests_without_a_valid_key_are_401(stack):
    client = openai.OpenAI(base_url=stack.base_url, api_key="msk-nope-nope", max_retries=0,
                           timeout=60)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    r = httpx.post(f"{stack.base_url}/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_chat_completion_has_text_and_usage(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello, how are you?"}],
        max_tokens=8, temperature=0)
    choice = resp.choices[0]
    # Random weights: the text may be anything, even empty, but it is a string.
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_greedy_completion_is_deterministic(client):
    texts = {client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6,
                                       temperature=0).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_streamed_chat_usage_matches_streamed_tokens(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True}, )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason in ("length", "stop")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    # vLLM's first chunk carries the role only; it may merge tokens into one delta, never split
    # one across chunks.
    texts = [c for c in content_chunks if c.choices[0].delta.content]
    assert len(texts) <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_completion_without_usage_option(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=5, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_models_and_health(client, stack):
    assert [m.id for m in client.models.list().data] == [MODEL]
    root = stack.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health", timeout=30).json() == {"status": "ok"}


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_malformed_body_is_400(stack, key):
    r = httpx.post(f"{stack.base_url}/chat/completions", content=b"{oops",
                   headers={"content-type": "application/json", **auth(key)}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_prompt_longer_than_context_is_400(client):
    # vLLM's own answer, relayed as `vllm serve` gives it.
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model=MODEL, prompt="hello world " * 400, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_model_len=512"):
        client.chat.completions.create(model=MODEL, max_tokens=600,
                                       messages=[{"role": "user", "content": "hi"}])


def test_oversized_body_is_413(stack, key):
    r = httpx.post(f"{stack.base_url}/completions", headers=auth(key),
                   json={"model": MODEL, "prompt": "x" * 70000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_concurrent_requests_all_succeed(stack, key):
    async def run():
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0,
                                    timeout=120)
        return await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=f"Count to {i}", max_tokens=8) for i in range(8)))
    results = asyncio.run(run())
    assert all(r.usage.completion_tokens > 0 for r in results)


def test_client_disconnect_mid_stream_is_recorded_as_499(stack, key):
    body = {"model": MODEL, "prompt": "Long story:", "max_tokens": 400, "stream": True,
            "temperature": 1.0}
    with httpx.stream("POST", f"{stack.base_url}/completions", json=body, timeout=60,
                      headers=auth(key)) as r:
        assert r.status_code == 200
        for n, _ in enumerate(r.iter_lines()):
            if n > 3:
                break

    def closed() -> list[str]:
        metrics = httpx.get(f"{stack.operator_url}/metrics", timeout=30).text
        return [line for line in metrics.splitlines()
                if line.startswith("moestack_requests_total") and 'status="499"' in line]

    # A scrape (the operator listener's thread) may see the series created at 0.0 just before
    # it is incremented: wait for the count, then check it stays one.
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline and not any(line.endswith(" 1.0") for line in lines):
        time.sleep(0.5)
        lines = closed()
    time.sleep(1.0)
    assert len(lines) == 1 and lines[0].endswith(" 1.0") and closed() == lines, lines


def test_every_request_has_one_settled_ledger_row(stack):
    out = subprocess.run(
        [sys.executable, "-m", "moestack", "usage", "--json", "--rows", "--tenant", "default",
         "--config", str(stack.tmp_dir / "config.yaml")],
        capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len({r["request_id"] for r in rows}) == len(rows)
    assert {r["state"] for r in rows} == {"settled"}
    codes = [r["status_code"] for r in rows]
    assert codes.count(200) >= 8 and 499 in codes, codes
    assert all(r["completion_tokens"] > 0 for r in rows if r["status_code"] == 200)


def test_metrics_count_tokens(stack):
    metrics = httpx.get(f"{stack.operator_url}/metrics", timeout=30).text
    assert any(line.startswith("moestack_tokens_total") and 'kind="completion"' in line
               and MODEL in line for line in metrics.splitlines())
    assert "moestack_time_to_first_token_seconds_bucket" in metrics


def test_engine_failure_is_503_and_health_reports_it(client, stack):
    import psutil

    cores = [p for p in psutil.process_iter(["pid", "name", "cmdline"])
             if _env(p).get("TMPDIR") == str(stack.tmp_dir)
             and "EngineCor" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])]
    assert cores, "no vLLM engine-core process found"
    for p in cores:
        p.kill()
    time.sleep(2)
    # A SIGKILLed process cannot unlink its shared-memory segments: remove the killed engine's
    # orphans here so the shutdown check below sees only what a clean stop leaves behind.
    for name in set(os.listdir("/dev/shm")) - stack.shm_before:
        if not _in_use(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "still there?"}])
    assert info.value.status_code == 503
    assert info.value.body["type"] == "service_unavailable_error"


def test_ctrl_c_stops_everything_cleanly(stack):
    code = stack.stop()
    assert code == 0, stack.text()[-3000:]
    assert "stopped." in stack.text()
    deadline = time.monotonic() + 30
    while stack.leftover_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert stack.leftover_processes() == []
    leaked = {f for f in set(os.listdir("/dev/shm")) - stack.shm_before
              if not _in_use(f"/dev/shm/{f}")}
    assert not leaked, f"files left in /dev/shm: {sorted(leaked)}"


def test_sigterm_stops_a_stack_as_cleanly_as_ctrl_c():
    """`kill` / `docker stop` send SIGTERM; Ray installs its own handler for it at start-up."""
    import signal

    tmp = short_temp_dir()
    config = {"models": [{"name": "fake-moe", "engine": "fake"}],
              "gateway": {"host": "127.0.0.1", "port": free_port()},
              "storage": {"url": f"sqlite:///{tmp / 'moestack.db'}"},
              "tenancy": {"enabled": False}, "ray": {"num_cpus": 2}}
    s = start_stack(config, tmp)
    try:
        code = s.stop(sig=signal.SIGTERM)
        assert code == 0 and "stopped." in s.text(), s.text()[-3000:]
        deadline = time.monotonic() + 30
        while s.leftover_processes() and time.monotonic() < deadline:
            time.sleep(1)
        assert s.leftover_processes() == []
    finally:
        if s.proc.poll() is None:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _in_use(path: str) -> bool:
    """Whether a live process maps or holds ``path`` open (then it is not ours: ours are gone)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if any(m.path == path for m in p.memory_maps(grouped=True)) or \
                    any(f.path == path for f in p.open_files()):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


def _env(p) -> dict:
    import psutil

    try:
        return p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
