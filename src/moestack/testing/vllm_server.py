"""vLLM's own OpenAI server in a child process: the reference the tests compare moestack with."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from moestack.engine.vllm_engine import IN_CORE_WORKER_ENV
from moestack.loadtest.compare import wait_http_ok
from moestack.net import free_port


@contextmanager
def vllm_server(model: Path | str, served_name: str, args: Sequence[str], log_path: Path,
                start_timeout_s: float = 600.0) -> Iterator[str]:
    """Run ``vllm.entrypoints.openai.api_server`` on ``model`` with ``args`` on a free loopback
    port; yields its base URL once ``/health`` answers, stops it on exit. A server that exits or
    does not answer in ``start_timeout_s`` raises RuntimeError with the tail of its log."""
    port = free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
             *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # One CPU worker inside the engine-core process, as moestack's CPU engines run it
            # (moestack.engine.vllm_engine.IN_CORE_WORKER_ENV): no third process importing vLLM.
            env={**IN_CORE_WORKER_ENV, **os.environ})
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http_ok(f"{base}/health", timeout_s=start_timeout_s, interval_s=0.25,
                             proc=proc)
            except TimeoutError as exc:
                log.seek(0)
                raise RuntimeError(f"vLLM's server did not start ({exc}):\n"
                                   f"{log.read()[-6000:]}") from None
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
