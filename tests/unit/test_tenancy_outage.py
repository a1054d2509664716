"""A locked or read-only SQLite store answers 503 within the bounded wait; it recovers by itself;
cached authentication follows revocations within its TTL; bad input is a 4xx, never a 500."""

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import time

import openai
import pytest

from moestack.tenancy import query_usage
from moestack.testing import fake_config, fake_model
from moestack.testing.local_api import local_stack

MODEL = "fake-moe"
BUSY_S = 0.5


def config(tmp_path, **tenancy):
    return fake_config(fake_model(MODEL), storage={"url": f"sqlite:///{tmp_path}/t.db",
                                                   "busy_timeout_s": BUSY_S},
                       tenancy={"enabled": True, **tenancy})


@pytest.fixture
async def stack(tmp_path):
    async with local_stack(config(tmp_path)) as s:
        yield s


def new_key(stack, name="acme", **limits):
    return stack.tenancy.store.create_tenant(name, **limits)[1].plaintext


async def post_chat(stack, key, content="hi"):
    started = time.monotonic()
    body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": content}]}
    r = await stack.http.post("/v1/chat/completions", content=json.dumps(body),
                              headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": "application/json"})
    return r, time.monotonic() - started


def assert_clear_503(r, elapsed_s):
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "service_unavailable"
    assert int(r.headers["Retry-After"]) >= 1
    assert "Traceback" not in r.text and "sqlite" not in r.text.lower()
    assert "OperationalError" not in r.text
    assert elapsed_s < BUSY_S + 1.5, elapsed_s


async def test_locked_store_answers_503_within_the_wait_and_recovers(stack, tmp_path):
    key = new_key(stack)
    assert (await post_chat(stack, key))[0].status_code == 200
    served_before = len(query_usage(stack.tenancy.store))
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        for _ in range(3):
            r, elapsed = await post_chat(stack, key)
            assert_clear_503(r, elapsed)
        started = time.monotonic()
        ready = await stack.http.get("/ready")
        assert ready.status_code == 503 and time.monotonic() - started < BUSY_S + 1.5
        assert (await stack.http.get("/health")).status_code == 200  # the models are fine
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    r, _ = await post_chat(stack, key)
    assert r.status_code == 200
    assert (await stack.http.get("/ready")).status_code == 200
    stack.tenancy.writer.flush()
    rows = query_usage(stack.tenancy.store)
    assert len(rows) == served_before + 1 and all(row.state == "settled" for row in rows)


async def writer_idle(stack, quiet_s=0.3, timeout_s=10.0):
    """Until the store writer has nothing queued and wrote no batch for ``quiet_s``."""
    writer = stack.tenancy.writer
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batches = writer.batches
        await asyncio.sleep(quiet_s)
        if writer.batches == batches and writer.pending() == 0:
            return
    raise AssertionError(f"the store writer still busy after {timeout_s:g} s")


async def test_requests_served_while_the_store_locks_settle_once_it_is_back(tmp_path):
    async with local_stack(config(tmp_path, settle_flush_interval_ms=1000)) as stack:
        key = new_key(stack)
        await writer_idle(stack)  # the start's beat done: its writes would take the settlement
        holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
        r, _ = await post_chat(stack, key)  # admitted; its settlement waits for the flush
        assert r.status_code == 200
        holder.execute("BEGIN IMMEDIATE")
        try:
            time.sleep(1.2 + BUSY_S)  # the flush meets the lock and keeps the settlement
            assert stack.tenancy.writer.pending() == 1
            [row] = query_usage(stack.tenancy.store)  # readers still read
            assert row.state == "pending"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        stack.tenancy.writer.flush(timeout_s=10)
        [row] = query_usage(stack.tenancy.store)
        assert (row.state, row.status_code, row.completion_tokens) == ("settled", 200, 3)


def make_read_only(db):
    """Make the database and its WAL read-only even for root (immutable attribute), else by
    mode. (The shared-memory index stays writable: SQLite maps it, and readers need it.)"""
    files = [str(p) for p in (db, db.with_name(db.name + "-wal"))
             if p.exists()]
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root without chattr: cannot make a file read-only")
        proc = subprocess.run(["chattr", "+i", *files], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"chattr +i failed: {proc.stderr.decode().strip()}")
        return lambda: subprocess.run(["chattr", "-i", *files], check=True)
    for f in files:
        os.chmod(f, 0o444)
    return lambda: [os.chmod(f, 0o644) for f in files]


async def test_read_only_store_answers_503_and_recovers(stack, tmp_path):
    key = new_key(stack)
    assert (await post_chat(stack, key))[0].status_code == 200
    stack.tenancy.writer.flush()
    undo = make_read_only(tmp_path / "t.db")
    try:
        r, elapsed = await post_chat(stack, key)
        assert_clear_503(r, elapsed)
        assert (await stack.http.get("/ready")).status_code == 503
    finally:
        undo()
    assert (await post_chat(stack, key))[0].status_code == 200
    assert (await stack.http.get("/ready")).status_code == 200


async def test_revocation_and_limit_changes_reach_a_cached_gateway_within_the_ttl(tmp_path):
    async with local_stack(config(tmp_path, auth_cache_ttl_s=0.5)) as stack:
        store = stack.tenancy.store
        _, made = store.create_tenant("acme")
        client = stack.openai(made.plaintext)
        for _ in range(10):
            await client.models.list()
        assert stack.tenancy.auth.store_reads == 1  # one read for ten requests
        store.set_limits("acme", requests_per_min=0)
        time.sleep(0.6)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        store.revoke_key(made.key_id)
        time.sleep(0.6)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_the_auth_cache_follows_a_revocation_off_the_request_path(tmp_path):
    async with local_stack(config(tmp_path, auth_cache_ttl_s=0.4)) as stack:
        store, auth = stack.tenancy.store, stack.tenancy.auth
        _, made = store.create_tenant("acme")
        client = stack.openai(made.plaintext)
        await client.chat.completions.create(  # a request starts the gateway's background work
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert made.key_id in auth._entries
        store.revoke_key(made.key_id)
        await asyncio.sleep(0.5)  # no request: only the background check can have seen it
        assert made.key_id not in auth._entries
        assert time.monotonic() - auth._checked_at < auth.ttl_s  # requests need not read it
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_bad_time_arguments_are_a_400(stack):
    key = new_key(stack)
    for since in ("99999999999d", "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+01:00",
                  "yesterday"):
        r = await stack.http.get("/v1/usage", params={"since": since},
                                 headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "since", since
