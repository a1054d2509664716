"""Misbehaving clients and usage reconciliation, for the reliability suite.

- :class:`UsageRecorder`: a usage sink (like the ledger) that collects every request's record, and
  :meth:`UsageRecorder.reconcile` to count requests lost (no record) or double-billed (several);
- :func:`slow_clients`: slowloris-style connections that send a request a few bytes at a time;
- :func:`leave_mid_stream` and :func:`leave_before_first_token`: clients that disconnect.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from moestack.api.relay import REQUEST_ID_HEADER


@dataclass(frozen=True)
class Reconciliation:
    """Client-side outcomes checked against usage records."""

    requests: int
    """Requests whose id the client learnt (it saw at least the start of a response)."""
    lost: int
    """Of those, requests with no usage record."""
    double_billed: int
    """Request ids with more than one usage record."""


class UsageRecorder:
    """A thread-safe usage sink (the gateway may run in another thread) keyed by request id."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[str, list] = {}

    def record(self, rec) -> None:
        with self._lock:
            self._records.setdefault(rec.request_id, []).append(rec)

    def snapshot(self) -> dict[str, list]:
        with self._lock:
            return {k: list(v) for k, v in self._records.items()}

    def reconcile(self, request_ids: Iterable[str]) -> Reconciliation:
        records = self.snapshot()
        ids = set(request_ids)
        return Reconciliation(requests=len(ids), lost=sum(1 for i in ids if i not in records),
                              double_billed=sum(1 for v in records.values() if len(v) > 1))


MALFORMED_CHAT_BODIES: dict[str, bytes] = {
    "empty": b"",
    "array": b"[]",
    "truncated": b"{",
    "null": b"null",
    "no-messages": b'{"model": "fake-moe"}',
    "bad-utf8": b'{"model":"fake-moe","messages":[{"role":"user","content":"\xff\xfe"}]}',
    "deep-nesting": b'{"model":"fake-moe","messages":' + b"[" * 20000 + b"]" * 20000 + b"}",
    "huge-int": b'{"model":"fake-moe","max_tokens":1' + b"0" * 5000 + b',"messages":[]}',
    "nan": b'{"model":"fake-moe","max_tokens":NaN,"messages":[{"role":"user","content":"hi"}]}',
    "bad-role": b'{"model":"fake-moe","messages":[{"role":"wizard","content":"hi"}]}',
    "bad-stream-flag": b'{"model":"fake-moe","stream":"yes please","messages":'
                       b'[{"role":"user","content":"hi"}]}',
    "longer-than-context": b'{"model":"fake-moe","messages":[{"role":"user","content":"'
                           + b"a " * 5000 + b'"}]}',
}
"""Bodies for POST /v1/chat/completions that must each get an OpenAI-shaped 400 (model
``fake-moe`` with a context under 5000 tokens)."""


def slow_clients(port: int, count: int, stop: threading.Event, slow_body: bool = False,
                 interval_s: float = 0.5) -> None:
    """Open ``count`` connections that never finish their request, until ``stop`` is set.

    Headers mode sends one more header line per interval; body mode sends complete headers
    announcing a 60 kB body, then one byte per interval. Blocks; run it in a thread.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            if slow_body:
                head += "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{"
            s.sendall(head.encode())
            socks.append(s)
        while not stop.is_set():
            for s in socks:
                try:
                    s.sendall(b"a" if slow_body else b"X-Slow: 1\r\n")
                except OSError:  # the server closed this one: that is allowed
                    pass
            stop.wait(interval_s)
    finally:
        for s in socks:
            s.close()


async def leave_mid_stream(http: httpx.AsyncClient, body: dict, after_events: int = 2
                           ) -> str | None:
    """Stream ``body`` (a chat request), read ``after_events`` events, then disconnect.

    Returns the request's ledger id, or None if the request failed before streaming."""
    async with http.stream("POST", "chat/completions", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            return None
        ledger_id = resp.headers.get(REQUEST_ID_HEADER)
        seen = 0
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                seen += 1
                if seen >= after_events:
                    return ledger_id or json.loads(line[5:])["id"]
    return None


async def leave_before_first_token(http: httpx.AsyncClient, body: dict,
                                   after_s: float) -> None:
    """Send ``body`` and give up after ``after_s`` seconds, before any response arrives."""
    try:
        await asyncio.wait_for(http.post("chat/completions", json=body), timeout=after_s)
    except (TimeoutError, httpx.TimeoutException):
        return


def reconcile_ledger(entries: Iterable, results: Iterable) -> Reconciliation:
    """Check client results against usage-ledger rows (:class:`moestack.tenancy.LedgerEntry`).

    ``requests``: client requests that completed; ``lost``: of those, requests whose row is not
    settled with status 200 and the same token counts the client saw; ``double_billed``: rows
    charged more tokens than they used (a row exists once per request id by construction)."""
    rows = {e.request_id: e for e in entries}
    done = [r for r in results if r.ok and r.ledger_id]
    lost = 0
    for r in done:
        row = rows.get(r.ledger_id)
        if row is None or (row.state, row.status_code) != ("settled", 200) or (
                row.prompt_tokens, row.completion_tokens) != (r.prompt_tokens,
                                                              r.completion_tokens):
            lost += 1
    over = sum(1 for e in rows.values() if e.state == "settled"
               and e.charged_tokens > e.prompt_tokens + e.completion_tokens)
    return Reconciliation(requests=len(done), lost=lost, double_billed=over)
