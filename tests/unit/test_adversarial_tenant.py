"""An attacker tenant sends extreme and malformed requests while a victim tenant works normally
(fake engine, in-process gateway, SQLite; tests/integration/test_adversarial_postgres.py runs the
same on PostgreSQL).

The attacks are drawn by hypothesis (`n`, list prompts, completion budgets, logprobs, nesting,
non-finite numbers, engine-internal and unknown fields, hidden models, huge headers, broken
bodies), plus the exact requests of the report that found the holes. Whatever they are:

* every victim request is answered 200, and its ledger row holds the usage its client received;
* no ledger row is left ``pending`` and no tenant's in-flight counter is left above 0;
* the attacker gets only 4xx, each an OpenAI-shaped error with a message; never a 5xx.

Each run prints its figures (``adversarial ...:``), summed over the examples.
"""

from __future__ import annotations

import asyncio
import collections
import json
import string
from dataclasses import dataclass, field

import httpx
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from moestack.testing import fake_config, fake_model
from moestack.testing.fake_engine import REQUEST_FIELDS
from moestack.testing.local_api import local_stack

MODEL, HIDDEN = "fake-moe", "fake-hidden"
VICTIM_WORKERS, VICTIM_REQUESTS_PER_WORKER = 2, 5
ATTACK_CONCURRENCY = 8
EXAMPLES = 4


@dataclass(frozen=True)
class Attack:
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    kind: str = ""


def _raw(kind: str, fields: dict | str, path: str = "/v1/completions", model: str = MODEL,
         headers: tuple = ()) -> Attack:
    """A body of ``fields`` (a dict, or the JSON text of its members after ``model``)."""
    if isinstance(fields, dict):
        body = json.dumps({"model": model, **fields})
    else:
        body = '{"model": %s, %s}' % (json.dumps(model), fields)
    return Attack(path, body.encode(), headers, kind)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


FIXED = [  # the requests of the report, always sent
    _raw("n", '"prompt": "hi", "max_tokens": 2, "n": 1e400'),
    _raw("n", {"prompt": "hi", "max_tokens": 2, "n": 10**15}),
    _raw("n", {"prompt": "hi", "max_tokens": 2, "n": 70000}),
    _raw("n", {"prompt": "hi", "max_tokens": 2, "n": -1}),
    _raw("n", {"prompt": "hi", "max_tokens": 2, "n": True}),
    _raw("n", {"prompt": "hi", "max_tokens": 2, "n": "2"}),
    _raw("prompts", {"prompt": [[1]] * 100_000, "max_tokens": 2}),
    _raw("max_tokens", {"prompt": "hi", "max_tokens": 10**30}),
    _raw("logprobs", {"prompt": "hi", "logprobs": 10**9}),
    _raw("nesting", '"prompt": "hi", "stop": %s' % nested(5000)),
    _raw("engine_internal", {"prompt": "hi", "kv_transfer_params": {"do_remote_prefill": True}}),
    _raw("background", {"input": "hi", "background": True}, path="/v1/responses"),
    _raw("hidden_model", {"prompt": "hi", "unknown_field": 1}, model=HIDDEN),
    _raw("huge_header", {"prompt": "hi"}, headers=(("authorization", "Bearer " + "k" * 9000),)),
    _raw("huge_body", {"prompt": "x" * 2_000_000}),
]

BAD_N = st.one_of(st.integers(max_value=0), st.integers(min_value=17),
                  st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                  st.text(max_size=4), st.just([2]))
WORD = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=24)
ACCEPTED = frozenset().union(*REQUEST_FIELDS.values())
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(WORD, inner, max_size=3), max_leaves=8)


@st.composite
def attacks(draw) -> Attack:
    kind = draw(st.sampled_from([
        "n", "prompts", "max_tokens", "logprobs", "nesting", "non_finite", "unknown_field",
        "hidden_model", "engine_internal", "huge_header", "broken_body"]))
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    chat = path == "/v1/chat/completions"
    base = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    if kind == "n":
        return _raw(kind, {**base, "max_tokens": 2, "n": draw(BAD_N)}, path)
    if kind == "prompts":  # more prompts than a model takes in one request
        count = draw(st.integers(min_value=65, max_value=60_000))
        prompt = draw(st.sampled_from([["a b"] * count, [[7, 8]] * count]))
        return _raw(kind, {"prompt": prompt, "max_tokens": 2, "n": draw(st.integers(1, 16))})
    if kind == "max_tokens":  # past a 32-bit number, past the context, or not a count at all
        value = draw(st.one_of(st.integers(min_value=2**31), st.integers(max_value=0),
                               st.integers(min_value=257, max_value=2**31 - 1),
                               st.floats(), st.text(max_size=4)))
        name = draw(st.sampled_from(["max_tokens", "max_completion_tokens"] if chat
                                    else ["max_tokens"]))
        if isinstance(value, float):
            return _raw(kind, "%s, %s: %s" % (json.dumps(base)[1:-1], json.dumps(name),
                                              repr(value).replace("inf", "1e999")), path)
        return _raw(kind, {**base, name: value}, path)
    if kind == "logprobs":
        name = draw(st.sampled_from(["top_logprobs", "prompt_logprobs"] if chat
                                    else ["logprobs", "prompt_logprobs"]))
        value = draw(st.one_of(st.integers(min_value=21), st.integers(max_value=-1),
                               st.integers(min_value=0, max_value=20), st.text(max_size=3)))
        return _raw(kind, {**base, "logprobs": True, name: value} if chat and
                    name == "top_logprobs" else {**base, name: value}, path)
    if kind == "nesting":
        depth = draw(st.integers(min_value=64, max_value=3000))
        where = draw(st.sampled_from(["stop", "stream_options", "user", "metadata"]))
        return _raw(kind, "%s, %s: %s" % (json.dumps(base)[1:-1], json.dumps(where),
                                          nested(depth)), path)
    if kind == "non_finite":
        where = draw(st.sampled_from(["temperature", "top_p", "seed", "n", "max_tokens"]))
        value = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]))
        return _raw(kind, "%s, %s: %s" % (json.dumps(base)[1:-1], json.dumps(where), value),
                    path)
    if kind == "unknown_field":
        name = draw(WORD.filter(lambda w: w not in ACCEPTED))
        return _raw(kind, {**base, "max_tokens": 2, name: draw(JSON_VALUE)}, path)
    if kind == "hidden_model":
        extra = draw(st.dictionaries(WORD.filter(lambda w: w != "model"), JSON_VALUE,
                                     max_size=2))
        return _raw(kind, {**base, **extra}, path, model=HIDDEN)
    if kind == "engine_internal":
        name = draw(st.sampled_from(["kv_transfer_params", "ec_transfer_params"]))
        return _raw(kind, {**base, "max_tokens": 2, name: draw(JSON_VALUE)}, path)
    if kind == "huge_header":
        header = draw(st.sampled_from(["authorization", "x-api-key"]))
        size = draw(st.integers(min_value=1100, max_value=200_000))
        return _raw(kind, {**base, "max_tokens": 2}, path,
                    headers=((header, "Bearer " + "k" * size),))
    # A broken body: not UTF-8, not JSON, not an object, or no model.
    raw = draw(st.one_of(st.binary(max_size=64), st.just(b"\xff\xfe{"), st.just(b"[1, 2]"),
                         st.just(b'{"prompt": "hi"}'), st.just(b'{"model": 7}'),
                         st.just(b'{"model": "fake-moe", "prompt": "\\ud800"}')))
    return Attack(path, raw, (), kind)


@dataclass
class Figures:
    victim_requests: int = 0
    victim_200: int = 0
    victim_rows_matching_usage: int = 0
    attacker_requests: int = 0
    attacker_4xx: int = 0
    attacker_5xx: int = 0
    attacker_without_message: int = 0
    pending_rows_after_settlement: int = 0
    inflight_after_settlement: int = 0
    attacker_statuses: collections.Counter = field(default_factory=collections.Counter)
    attacker_kinds: collections.Counter = field(default_factory=collections.Counter)

    def add(self, other: Figures) -> None:
        for name, value in other.__dict__.items():
            if isinstance(value, collections.Counter):
                getattr(self, name).update(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def line(self, store: str) -> str:
        codes = ", ".join(f"{s}: {n}" for s, n in sorted(self.attacker_statuses.items()))
        return (f"adversarial {store}: victim {self.victim_200}/{self.victim_requests} 200, "
                f"{self.victim_rows_matching_usage} ledger rows equal to the usage answered; "
                f"attacker {self.attacker_requests} requests, {self.attacker_4xx} 4xx "
                f"({codes}), {self.attacker_5xx} 5xx, {self.attacker_without_message} without "
                f"a message; pending rows {self.pending_rows_after_settlement}, in flight "
                f"{self.inflight_after_settlement}; kinds {dict(self.attacker_kinds)}")


async def _victim(client: openai.AsyncOpenAI, worker: int, answers: dict, failures: list):
    """Normal traffic: chat and completions, streamed and not, list prompts with n."""
    for i in range(VICTIM_REQUESTS_PER_WORKER):
        try:
            kind = (worker + i) % 4
            if kind == 0:
                r = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}],
                    max_tokens=3)
                answers[r.id] = (r.usage.prompt_tokens, r.usage.completion_tokens)
            elif kind == 1:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "tell me more"}],
                    max_tokens=4, stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.usage is not None:
                        answers[chunk.id] = (chunk.usage.prompt_tokens,
                                             chunk.usage.completion_tokens)
            elif kind == 2:
                r = await client.completions.create(model=MODEL, prompt=["a b c", "d e"],
                                                    n=2, max_tokens=2)
                answers[r.id] = (r.usage.prompt_tokens, r.usage.completion_tokens)
            else:
                stream = await client.completions.create(
                    model=MODEL, prompt="one two three", max_tokens=5, stream=True,
                    stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.usage is not None:
                        answers[chunk.id] = (chunk.usage.prompt_tokens,
                                             chunk.usage.completion_tokens)
        except openai.APIError as exc:  # counted, reported by the assertions
            failures.append(f"{type(exc).__name__}: {exc}")


async def _attacker(stack, key: str, batch: list[Attack], figures: Figures, problems: list):
    gate = asyncio.Semaphore(ATTACK_CONCURRENCY)

    async def one(a: Attack):
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json",
                   **dict(a.headers)}
        async with gate:
            try:
                r = await stack.http.post(a.path, content=a.body, headers=headers)
            except Exception as exc:  # the app raised: what a server answers with a 500
                r = httpx.Response(500, text=f"unhandled {type(exc).__name__}: {exc}"[:300])
        figures.attacker_requests += 1
        figures.attacker_statuses[r.status_code] += 1
        figures.attacker_kinds[a.kind] += 1
        if 400 <= r.status_code < 500:
            figures.attacker_4xx += 1
        else:
            figures.attacker_5xx += r.status_code >= 500
            problems.append(f"{a.kind} {a.path} {a.body[:160]!r} -> {r.status_code} "
                            f"{r.text[:200]}")
        try:
            error = r.json()["error"]
            ok = isinstance(error["message"], str) and 0 < len(error["message"]) < 600 and \
                isinstance(error["type"], str)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            figures.attacker_without_message += 1
            problems.append(f"{a.kind}: no OpenAI-shaped error: {r.text[:200]}")

    await asyncio.gather(*(one(a) for a in batch))


async def attack_next_to_a_victim(url: str, batch: list[Attack]) -> tuple[Figures, list[str]]:
    """Run ``batch`` as the attacker while the victim works; the figures and what went wrong."""
    config = fake_config(
        fake_model(MODEL, fake={"token_interval_s": 0.002}), fake_model(HIDDEN),
        storage={"url": url}, tenancy={"enabled": True, "auth_cache_ttl_s": 0})
    figures, problems, failures, answers = Figures(), [], [], {}
    async with local_stack(config) as stack:
        store = stack.tenancy.store
        # The victim of the report: 4 requests in flight at most. The attacker: what a new
        # tenant gets by default (rate and concurrency limits), with access to MODEL only.
        _, victim_key = store.create_tenant("victim", max_concurrent_requests=4)
        _, attacker_key = store.create_tenant(
            "attacker", config.tenancy.new_tenant_defaults.settings(), allowed_models=[MODEL])
        client = stack.openai(victim_key.plaintext)
        await asyncio.gather(
            _attacker(stack, attacker_key.plaintext, batch, figures, problems),
            *(_victim(client, w, answers, failures) for w in range(VICTIM_WORKERS)))
        stack.tenancy.writer.flush()
        rows = {r.request_id: r for r in _ledger(store)}
        with store.read() as conn:
            figures.pending_rows_after_settlement = conn.execute(text(
                "SELECT COUNT(*) FROM usage_ledger WHERE state = 'pending'")).scalar()
            figures.inflight_after_settlement = conn.execute(text(
                "SELECT SUM(inflight) FROM tenant_counters")).scalar()
    figures.victim_requests = VICTIM_WORKERS * VICTIM_REQUESTS_PER_WORKER
    figures.victim_200 = len(answers)
    victim_rows = {rid: r for rid, r in rows.items() if r.tenant == "victim"}
    for response_id, usage in answers.items():
        row = victim_rows.get(response_id.split("-", 1)[1])
        if row is not None and row.state == "settled" and row.status_code == 200 and (
                row.prompt_tokens, row.completion_tokens) == usage:
            figures.victim_rows_matching_usage += 1
        else:
            problems.append(f"victim {response_id}: answered {usage}, ledger {row}")
    if len(victim_rows) != len(answers):
        problems.append(f"victim rows {len(victim_rows)} != answers {len(answers)}")
    problems += [f"victim request failed: {f}" for f in failures]
    return figures, problems


def _ledger(store):
    from moestack.tenancy import query_usage

    return query_usage(store)


def check(figures: Figures, problems: list[str]) -> None:
    assert not problems, "\n".join(problems[:20])
    assert figures.victim_200 == figures.victim_requests
    assert figures.victim_rows_matching_usage == figures.victim_requests
    assert figures.attacker_4xx == figures.attacker_requests and figures.attacker_5xx == 0
    assert figures.pending_rows_after_settlement == 0 and figures.inflight_after_settlement == 0


TOTALS = {"sqlite": Figures()}


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(drawn=st.lists(attacks(), min_size=15, max_size=25))
def test_attacker_gets_only_4xx_while_the_victim_is_served_and_metered_exactly(tmp_path_factory,
                                                                              drawn):
    url = f"sqlite:///{tmp_path_factory.mktemp('adversarial')}/ledger.db"
    figures, problems = asyncio.run(attack_next_to_a_victim(url, FIXED + drawn))
    TOTALS["sqlite"].add(figures)
    print(TOTALS["sqlite"].line("sqlite (running total)"))
    check(figures, problems)
