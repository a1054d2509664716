"""Start a throwaway PostgreSQL server on 127.0.0.1 for tests (initdb + pg_ctl on a temp dir).

    with postgres_server() as pg:
        url = pg.create_database("t1")   # postgresql+psycopg2://moestack@127.0.0.1:PORT/t1

The server binaries are found on PATH or under ``/usr/lib/postgresql/<version>/bin`` (Debian's
``postgresql`` package), newest version first; ``MOESTACK_PG_BIN`` names the folder explicitly.
PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (or
``nobody``) through ``runuser``. ``fsync`` is off: the tests kill clients, not the server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moestack.testing.stack_process import free_port

SUPERUSER = "moestack"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bin_dir() -> Path:
    if explicit := os.environ.get("MOESTACK_PG_BIN"):
        return Path(explicit)
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    if dirs and (Path(dirs[-1]) / "pg_ctl").exists():
        return Path(dirs[-1])
    raise PostgresUnavailable("PostgreSQL server binaries not found (install Debian "
                              "`postgresql` or set MOESTACK_PG_BIN)")


class PostgresServer:
    def __init__(self, base_dir: Path | None = None):
        self.bin = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="moestack-pg-", dir=base_dir))
        self.data = self.root / "data"
        self.port = free_port()
        self._user = self._run_as_user()

    @staticmethod
    def _run_as_user() -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise PostgresUnavailable("running as root and no `postgres` or `nobody` user to run as")

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self._user, "--", *args] if self._user else list(args)

    def _run(self, *args: str) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> PostgresServer:
        if self._user:  # the server user must reach and own its folder
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            for parent in [self.root, *self.root.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the server (again, on the same port and data) after :meth:`pause`."""
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                "-c full_page_writes=off -c max_connections=100")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-w", "-t", "60", "-o", opts, "start")
        return self

    def pause(self) -> None:
        """Stop the server, keeping its data (outage tests): clients get connection errors."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                      "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", SUPERUSER, name)
        return self.url(name)


@contextmanager
def postgres_server(base_dir: Path | None = None) -> Iterator[PostgresServer]:
    server = PostgresServer(base_dir)
    try:
        yield server.start()
    finally:
        server.stop()
