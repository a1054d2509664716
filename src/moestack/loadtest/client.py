"""The load generator's HTTP client: open-loop arrivals, bounded concurrency, per-chunk timing.

Timing follows ``vllm bench serve`` so the figures can be compared with it:

- TTFT: from sending the request to the first streamed chunk that carries generated text;
- ITL: the gap between two consecutive text-carrying chunks (one value per chunk, so a chunk
  holding several tokens counts once, as in vLLM's benchmark);
- E2EL: from sending the request to the end of the response;
- output tokens: ``usage.completion_tokens`` of the response (streams ask for
  ``stream_options.include_usage``), or the number of text chunks when the server sends none.

Requests go out at their scheduled start times whether or not earlier ones finished (open loop);
at most ``max_concurrency`` are in flight, later ones wait for a slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from moestack.api.relay import REQUEST_ID_HEADER
from moestack.loadtest.scenario import Scenario
from moestack.loadtest.workload import RequestSpec

CONNECTION_ERROR = 0
"""``status`` of a request that got no HTTP response (refused, reset, timed out)."""


@dataclass
class RequestResult:
    """What one request measured; times in seconds, ``sent_s`` relative to the run start."""

    index: int
    tenant: str
    sent_s: float
    status: int = CONNECTION_ERROR
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    text_chunks: int = 0
    error: str | None = None
    response_id: str | None = None
    """The ``id`` the server gave the response."""
    ledger_id: str | None = None
    """The request's id in moestack's usage ledger (the ``x-moestack-request-id`` header; the
    response id for other servers): reconciles client results with the ledger."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (E2EL - TTFT) / (output tokens - 1)."""
        if self.ttft_s is None or self.e2e_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


def request_body(scenario: Scenario, spec: RequestSpec) -> dict:
    body: dict = {"model": scenario.model, "max_tokens": spec.max_tokens,
                  "stream": scenario.stream}
    if scenario.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if scenario.stream:
        body["stream_options"] = {"include_usage": True}
    if scenario.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(event: dict) -> str:
    text = ""
    for choice in event.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if delta else (choice.get("text") or "")
    return text


def _take_usage(result: RequestResult, usage: Mapping | None) -> None:
    if not usage:
        return
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    result.cached_prompt_tokens = int(details.get("cached_tokens") or 0)


def _error_text(body: bytes) -> str:
    try:
        err = json.loads(body).get("error") or {}
        return f"{err.get('code') or err.get('type')}: {err.get('message', '')}"[:300]
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")


async def send_one(http: httpx.AsyncClient, path: str, body: dict, headers: Mapping[str, str],
                   result: RequestResult, timeout_s: float) -> RequestResult:
    """Send one request and fill ``result`` with its timings, usage and outcome."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", path, json=body, headers=headers) as resp:
                result.status = resp.status_code
                result.ledger_id = resp.headers.get(REQUEST_ID_HEADER)
                if resp.status_code != 200:
                    result.error = _error_text(await resp.aread())
                elif body.get("stream"):
                    await _read_stream(resp, result, started)
                else:
                    data = json.loads(await resp.aread())
                    if not isinstance(data, dict):
                        raise ValueError("the response is not a JSON object")
                    result.response_id = data.get("id")
                    result.ledger_id = result.ledger_id or result.response_id
                    _take_usage(result, data.get("usage"))
                    result.text_chunks = 1 if _chunk_text(data) else 0
    except (httpx.HTTPError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.e2e_s = time.perf_counter() - started
    if result.ok and not result.completion_tokens:
        result.completion_tokens = result.text_chunks
    return result


async def _read_stream(resp: httpx.Response, result: RequestResult, started: float) -> None:
    last = None
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        now = time.perf_counter()
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if not isinstance(event, dict):
            result.error = f"malformed stream event: {data[:100]}"
            return
        if "error" in event:
            err = event["error"] or {}
            result.error = f"stream error {err.get('code')}: {err.get('message', '')}"[:300]
            return
        result.response_id = result.response_id or event.get("id")
        result.ledger_id = result.ledger_id or result.response_id
        _take_usage(result, event.get("usage"))
        if _chunk_text(event):
            if last is None:
                result.ttft_s = now - started
            else:
                result.itl_s.append(now - last)
            last = now
            result.text_chunks += 1
    if not done:
        result.error = "stream ended without [DONE]"


@dataclass
class RunOutcome:
    results: list[RequestResult]
    duration_s: float


async def run_requests(http: httpx.AsyncClient, scenario: Scenario, specs: Sequence[RequestSpec],
                       api_keys: Mapping[str, str],
                       on_done: Callable[[RequestResult], None] | None = None) -> RunOutcome:
    """Send ``specs`` on their schedule through ``http`` (its ``base_url`` ends in ``/v1``)."""
    path = "chat/completions" if scenario.endpoint == "chat" else "completions"
    slots = asyncio.Semaphore(scenario.max_concurrency)
    results: list[RequestResult] = []
    run_start = time.perf_counter()

    async def one(spec: RequestSpec) -> None:
        async with slots:
            key = api_keys.get(spec.tenant)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            result = RequestResult(spec.index, spec.tenant, time.perf_counter() - run_start)
            await send_one(http, path, request_body(scenario, spec), headers, result,
                           scenario.timeout_s)
            results.append(result)
            if on_done is not None:
                on_done(result)

    async with asyncio.TaskGroup() as tasks:
        for spec in specs:
            delay = spec.start_s - (time.perf_counter() - run_start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.create_task(one(spec))
    results.sort(key=lambda r: r.index)
    return RunOutcome(results, time.perf_counter() - run_start)
