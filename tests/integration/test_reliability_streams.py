"""The gateway under abuse, over real HTTP (uvicorn, as the Ray Serve proxy uses) with the fake
engine: 1000 concurrent streams, clients that disconnect, slowloris-style slow clients, and
oversized or malformed bodies. Every request must end in exactly one usage record, and nothing
(engine requests, server tasks, connections, file descriptors) may be left behind."""

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest

from moestack.loadtest import parse_scenario, run_scenario
from moestack.loadtest.abuse import (
    MALFORMED_CHAT_BODIES,
    UsageRecorder,
    leave_before_first_token,
    leave_mid_stream,
    slow_clients,
)
from moestack.testing import fake_config, fake_model
from moestack.testing.gateway_server import serve_gateway

pytestmark = pytest.mark.integration

MODEL, SLOW = "fake-moe", "slow-moe"
MAX_BODY = 65536


@pytest.fixture(scope="module")
def sink():
    return UsageRecorder()


@pytest.fixture(scope="module")
def server(sink):
    config = fake_config(
        fake_model(MODEL, max_model_len=4096, fake={"ttft_s": 0.01, "token_interval_s": 0.005}),
        fake_model(SLOW, max_model_len=4096, fake={"ttft_s": 1.0, "token_interval_s": 0.05}),
        gateway={"max_body_bytes": MAX_BODY})
    with serve_gateway(config, sinks=[sink]) as s:
        yield s


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def idle(server) -> bool:
    return (all(e.stats().running_requests == 0 for e in server.engines.values())
            and server.running_tasks() == 0 and server.open_connections() == 0)


def chat(model=MODEL, max_tokens=8, stream=True, content="hello there"):
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": content}]}


async def test_1000_concurrent_streams_complete_without_errors_or_leaks(server, sink):
    assert wait_until(lambda: idle(server))
    fds_before = open_fds()
    peak = [0]
    engine = server.engines[MODEL]

    async def watch():
        while True:
            peak[0] = max(peak[0], engine.stats().running_requests)
            await asyncio.sleep(0.01)

    scenario = parse_scenario({
        "name": "1000-streams", "model": MODEL, "num_requests": 1000, "max_concurrency": 1000,
        "timeout_s": 120, "ignore_eos": False, "tenants": [{"name": "t"}],
        "prompt_tokens": {"mean": 8}, "output_tokens": {"mean": 16}})
    watcher = asyncio.create_task(watch())
    run = await run_scenario(scenario, server.base_url, {}, plots=False)
    watcher.cancel()
    assert run.report["requests"]["failed"] == 0, run.report["requests"]["errors"]
    assert all(r.completion_tokens == 16 and r.text_chunks == 16 for r in run.results)
    assert peak[0] >= 500  # the streams really were open at the same time
    assert wait_until(lambda: idle(server)), (server.running_tasks(), server.open_connections())
    assert open_fds() <= fds_before + 5
    check = sink.reconcile(r.ledger_id for r in run.results)
    assert (check.requests, check.lost, check.double_billed) == (1000, 0, 0)
    records = sink.snapshot()
    assert all(records[r.ledger_id][0].completion_tokens == 16 for r in run.results)


async def test_client_disconnect_mid_stream_aborts_engine_request_and_records_once(server, sink):
    before = set(sink.snapshot())
    engine = server.engines[SLOW]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        ids = await asyncio.gather(*(leave_mid_stream(http, chat(SLOW, max_tokens=200))
                                     for _ in range(20)))
    assert None not in ids
    assert wait_until(lambda: idle(server))
    by_id = sink.snapshot()
    new = {i: by_id[i] for i in set(by_id) - before}
    assert set(ids) <= set(new)
    for rid in ids:
        (rec,) = new[rid]
        assert rec.status_code == 499 and 2 <= rec.completion_tokens < 200
        assert rid in engine.aborted


async def test_client_disconnect_before_first_token_leaves_nothing_behind(server, sink):
    before = set(sink.snapshot())
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        await asyncio.gather(*(leave_before_first_token(http, chat(SLOW, stream=s), 0.3)
                               for s in (True, False) * 5))
    assert wait_until(lambda: idle(server))
    new = [rs for rid, rs in sink.snapshot().items() if rid not in before]
    assert len(new) == 10 and all(len(rs) == 1 for rs in new)
    assert all(rs[0].completion_tokens < 10 for rs in new)


@pytest.mark.parametrize("slow_part", ["headers", "body"])
async def test_slow_clients_do_not_block_others_and_are_released(server, slow_part):
    assert wait_until(lambda: idle(server))
    stop = threading.Event()
    thread = threading.Thread(target=slow_clients,
                              args=(server.port, 200, stop, slow_part == "body"))
    thread.start()
    try:
        assert wait_until(lambda: server.open_connections() >= 200)
        scenario = parse_scenario({
            "name": "beside-slowloris", "model": MODEL, "num_requests": 50,
            "max_concurrency": 10, "timeout_s": 30, "ignore_eos": False,
            "tenants": [{"name": "t"}], "prompt_tokens": {"mean": 8},
            "output_tokens": {"mean": 8}})
        run = await run_scenario(scenario, server.base_url, {}, plots=False)
        assert run.report["requests"]["failed"] == 0, run.report["requests"]["errors"]
    finally:
        stop.set()
        thread.join()
    assert wait_until(lambda: idle(server)), (server.running_tasks(), server.open_connections())


def _post_raw(port, head: bytes, body_chunks) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except OSError:  # the server answered early and closed
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                dict(line.split(b": ", 1) for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
                     ).get(b"content-length", b"0")):
            more = s.recv(65536)
            if not more:
                break
            data += more
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def test_oversized_body_by_content_length_gets_413(server):
    with httpx.Client(base_url=server.base_url) as http:
        resp = http.post("chat/completions", content=b"x" * (MAX_BODY + 1),
                         headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_without_length_gets_413(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 8192
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY // 8192 + 2) + [b"0\r\n\r\n"]
    status, body = _post_raw(server.port, head, chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body", list(MALFORMED_CHAT_BODIES.values()),
                         ids=list(MALFORMED_CHAT_BODIES))
def test_malformed_bodies_get_openai_shaped_400(server, body):
    with httpx.Client(base_url=server.base_url) as http:
        resp = http.post("chat/completions", content=body,
                         headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    # The gateway's own refusals are OpenAI's invalid_request_error; the rest is the engine's
    # answer, relayed as vLLM's server gives it (type BadRequestError).
    assert error["type"] in ("invalid_request_error", "BadRequestError") and error["message"]


def test_prompt_longer_than_context_gets_400_not_an_engine_call(server):
    with httpx.Client(base_url=server.base_url) as http:
        resp = http.post("chat/completions", json=chat(content="a " * 5000, stream=False))
    assert resp.status_code == 400
    assert "maximum context length" in resp.json()["error"]["message"]


async def test_abandoned_non_streamed_request_is_recorded_as_client_closed(server, sink):
    before = set(sink.snapshot())
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        await leave_before_first_token(http, chat(SLOW, stream=False), 0.3)
    assert wait_until(lambda: idle(server) and len(set(sink.snapshot()) - before) == 1)
    (rid,) = set(sink.snapshot()) - before
    assert sink.snapshot()[rid][0].status_code == 499
