"""Run ``moestack up`` as a child process, the way a user does, for integration tests.

The child gets its own ``TMPDIR``/``RAY_TMPDIR`` so that every process it starts (Ray daemons,
Serve replicas, vLLM engine cores) can be found afterwards by its environment and checked gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moestack.net import free_port  # noqa: F401  (benchmarks and tests import it from here)

READY_LINE = "Press Ctrl-C to stop."  # the last line of the ready banner
GATEWAY_PROCESS = "ServeReplica:moestack:Gateway"  # a Gateway replica's process title


@dataclass
class StackProcess:
    """A running ``moestack up``; ``base_url`` ends in ``/v1``."""

    proc: subprocess.Popen
    base_url: str
    tmp_dir: Path
    output: list[str] = field(default_factory=list)
    operator_url: str = ""
    """The first gateway replica's operator listener (admin API, /metrics)."""

    def text(self) -> str:
        return "".join(self.output)

    def bootstrap_key(self) -> str | None:
        """The API key the banner printed for the bootstrap tenant, if it printed one."""
        found = re.search(r"API key of tenant `[^`]+` .*: (\S+)", self.text())
        return found.group(1) if found else None

    def stop(self, timeout_s: float = 180.0, sig: int = signal.SIGINT) -> int:
        """Send Ctrl-C (or ``sig``) and wait for the process to exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            exc.add_note("the stack's last output:\n" + "".join(self.output[-40:]))
            raise

    def gateway_processes(self) -> list:
        """The stack's Gateway replica processes (``ServeReplica:moestack:Gateway``), as
        ``psutil.Process`` objects, oldest first."""
        return [p for p in self._processes() if GATEWAY_PROCESS in " ".join(p.cmdline())]

    def _processes(self) -> list:
        import psutil

        marker, found = str(self.tmp_dir), []
        for p in psutil.process_iter():
            try:
                if p.environ().get("TMPDIR") == marker:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return sorted(found, key=lambda p: p.create_time())

    def leftover_processes(self) -> list[str]:
        """Processes still running whose environment points at this stack's temp folder."""
        import psutil

        marker = str(self.tmp_dir)
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get("TMPDIR") == marker:
                    found.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:120]}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found


def short_temp_dir() -> Path:
    """A fresh temp folder with a short path: Ray's socket paths must stay under 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp" if os.path.isdir("/tmp") else None))


def start_stack(config: dict, tmp_dir: Path | None = None, timeout_s: float = 600.0,
                extra_env: dict[str, str] | None = None) -> StackProcess:
    """Write ``config`` to ``tmp_dir`` and run ``moestack up`` on it until it is ready."""
    tmp_dir = tmp_dir or short_temp_dir()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / "config.yaml"
    gw = {"operator_port": free_port(), **config.get("gateway", {})}  # no fixed port to collide
    config = {**config, "gateway": gw}
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TMPDIR": str(tmp_dir), "RAY_TMPDIR": str(tmp_dir),
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moestack", "up", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    stack = StackProcess(proc, f"http://{gw.get('host', '127.0.0.1')}:{gw['port']}/v1", tmp_dir,
                         operator_url=f"http://{gw.get('operator_host', '127.0.0.1')}:"
                                      f"{gw['operator_port']}")
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            stack.output.append(line)
            sys.stderr.write(f"[moestack up] {line}")
            if READY_LINE in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                stack.stop()
            raise RuntimeError(f"moestack up did not become ready:\n{stack.text()}")
    return stack
