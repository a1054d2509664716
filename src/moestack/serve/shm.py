"""Shared-memory files the engine's processes leave in ``/dev/shm`` when they die.

vLLM's engine talks to its workers over shared-memory ring buffers (Python
``multiprocessing.shared_memory``: ``/dev/shm/psm_*``) and named semaphores
(``/dev/shm/sem.mp-*``); the process that creates one unlinks it when it exits cleanly. A
SIGKILLed replica (OOM kill, crash) never does, and the files (hundreds of MB on a real model)
stay until reboot. A file no live process maps or holds open is garbage: no process can reach it
any more except by name, and the names are random. :func:`clean_orphans` removes those, when a
replica starts (its predecessor may have been killed) and when the stack stops.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PATTERNS = ("psm_*", "sem.mp-*")
MIN_AGE_S = 10.0
"""Files younger than this are left alone: a process may have created one and not mapped it
yet."""


def in_use(shm_dir: Path = SHM_DIR) -> set[int]:
    """Inode numbers of the files in ``shm_dir`` that a process this one can inspect maps or
    holds open. Inodes, not names: glibc's ``sem_open`` maps a temporary file and renames it,
    so a live semaphore shows in ``/proc/<pid>/maps`` under a name it no longer has."""
    prefix = str(shm_dir).rstrip("/") + "/"
    try:
        device = os.stat(shm_dir).st_dev
    except OSError:
        return set()
    dev = f"{os.major(device):02x}:{os.minor(device):02x}"
    used: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[3] == dev:
                        used.add(int(fields[4]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    used.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return used


def orphans(shm_dir: Path = SHM_DIR, since: float | None = None,
            min_age_s: float = MIN_AGE_S) -> list[Path]:
    """The engine's shared-memory files in ``shm_dir`` owned by this user that no process
    uses, older than ``min_age_s`` and (if ``since`` is given, a ``time.time()``) changed since
    then."""
    if not shm_dir.is_dir():
        return []
    now, uid = time.time(), os.getuid()
    candidates: list[tuple[Path, int]] = []
    for pattern in PATTERNS:
        for path in shm_dir.glob(pattern):
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_uid != uid or now - st.st_mtime < min_age_s:
                continue
            if since is not None and st.st_mtime < since:
                continue
            candidates.append((path, st.st_ino))
    if not candidates:
        return []
    used = in_use(shm_dir)
    return [p for p, inode in candidates if inode not in used]


def clean_orphans(shm_dir: Path = SHM_DIR, since: float | None = None,
                  min_age_s: float = MIN_AGE_S) -> list[str]:
    """Remove :func:`orphans`; returns the names removed."""
    removed = []
    for path in orphans(shm_dir, since, min_age_s):
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    if removed:
        log.info("removed %d orphaned shared-memory file(s) from %s", len(removed), shm_dir)
    return removed
