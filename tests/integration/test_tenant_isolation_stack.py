"""Tenant isolation on the real stack (`moestack up`: Ray Serve + vLLM, tiny Mixtral, whose prefix
cache runs on CPU; MLA models turn it off there), on a real PostgreSQL whose URL holds a
password. One stack for the module:

* prefix cache: a tenant repeating its own prompt gets ``cached_tokens`` > 0; another tenant
  sending the same prompt gets 0 (the gateway's per-tenant ``cache_salt``);
* the store password is nowhere in Ray Serve's checkpoint in the GCS (deployment arguments);
* an 8 MB header on the public port (Ray Serve's proxy) gets 431, not a 500.
"""

import os
import shutil
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from moestack.tenancy.store import TenancyStore
from moestack.testing.postgres import PostgresUnavailable, postgres_server
from moestack.testing.stack_process import free_port, short_temp_dir, start_stack

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"
PASSWORD = "Stack-pg-pa55word-4b1d"
ADMIN_KEY = "tenant-isolation-stack-admin-key-0123456789"
PROMPT = ("The quarterly revenue of the northern division was 900 thousand, and the board "
          "asked for a full review of every account before the next meeting. ") * 4


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    try:
        with postgres_server(tmp_path_factory.mktemp("pg")) as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def stack(pg):
    url = pg.create_database("isolation").replace(
        "postgresql+psycopg2://moestack@", f"postgresql+psycopg2://moestack:{PASSWORD}@")
    tmp = short_temp_dir()
    config = {
        "models": [{
            "name": MODEL, "tiny": {"arch": "mixtral", "seed": 0},
            "architecture": "MixtralForCausalLM", "max_model_len": 512,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
            "engine_args": {"enforce_eager": True},
        }],
        "gateway": {"host": "127.0.0.1", "port": free_port(), "first_token_timeout_s": 120},
        "storage": {"url": url},  # a password in the config file: it must reach no GCS key
        "tenancy": {"enabled": True, "bootstrap_tenant": "victim"},
        "ray": {"num_cpus": 2},
    }
    s = start_stack(config, tmp, extra_env={"MOESTACK_ADMIN_KEY": ADMIN_KEY})
    s.url = url
    yield s
    if s.proc.poll() is None:
        s.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def cached_tokens(stack, key: str) -> tuple[int, int]:
    client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)
    usage = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


def test_a_tenant_repeating_its_prompt_hits_the_cache_and_another_tenant_gets_none(stack):
    victim = stack.bootstrap_key()
    store = TenancyStore.open(stack.url)
    try:
        prober = store.create_tenant("prober")[1].plaintext
    finally:
        store.close()
    figures = {"victim first": cached_tokens(stack, victim),
               "victim again": cached_tokens(stack, victim),
               "prober, same prompt": cached_tokens(stack, prober),
               "prober again": cached_tokens(stack, prober)}
    print("(prompt_tokens, cached_tokens):", figures)
    prompt_tokens = figures["victim first"][0]
    assert 250 < prompt_tokens < 400  # about 270 tokens: two whole KV blocks and a bit
    assert figures["victim first"][1] == 0
    assert figures["victim again"][1] > 0
    assert figures["prober, same prompt"][1] == 0
    assert figures["prober again"][1] > 0  # its own copy, under its own salt


def gcs_address(stack) -> str:
    """The GCS of the stack's Ray, from the port file of its session (it listens on every
    address)."""
    [port_file] = (stack.tmp_dir / "ray" / "session_latest").glob("gcs_server_port_*")
    return f"127.0.0.1:{port_file.read_text().strip()}"


SERVE_CHECKPOINT = """
import sys
from ray._raylet import GcsClient
gcs = GcsClient(address=sys.argv[1])
keys = gcs.internal_kv_keys(b"", namespace=b"serve")
sys.stderr.write(f"{len(keys)} keys\\n")
sys.stdout.buffer.write(b"".join(gcs.internal_kv_get(k, namespace=b"serve") or b"" for k in keys))
"""


def test_the_store_password_is_nowhere_in_ray_serves_checkpoint(stack):
    """Every key Ray Serve keeps in the GCS (its checkpoint, with every deployment's arguments),
    read by a separate process as any Ray node could (the stack's Ray uses token auth)."""
    out = subprocess.run([sys.executable, "-c", SERVE_CHECKPOINT, gcs_address(stack)],
                         capture_output=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    blob = out.stdout
    print(f"Serve checkpoint: {out.stderr.decode().strip()}, {len(blob)} bytes")
    assert b"isolation" in blob  # the Gateway's config is in there (the URL, less password)
    assert PASSWORD.encode() not in blob
    assert ADMIN_KEY.encode() not in blob


def test_an_8_mb_header_on_the_public_port_gets_431_not_500(stack):
    host, port = stack.base_url.removeprefix("http://").split("/")[0].split(":")
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        try:
            while sent < 8 << 20:
                sock.sendall(b"a" * 65536)
                sent += 65536
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while data := sock.recv(65536):
                answer += data
        except (ConnectionResetError, socket.timeout):
            pass
    print(f"sent {sent} bytes of header; answer {answer[:60]!r}")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"header_too_large" in answer
    # The stack still serves.
    assert httpx.get(f"http://{host}:{port}/health", timeout=30).status_code == 200
