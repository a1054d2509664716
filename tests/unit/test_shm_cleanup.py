"""Orphaned engine shared-memory files (``/dev/shm/psm_*``, ``sem.mp-*``) are removed; files a
live process maps or holds open, young files and other files are not."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moestack.serve.shm import clean_orphans, in_use, orphans


def old(path: Path, age_s: float = 60.0) -> Path:
    path.write_bytes(b"x" * 16)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_removes_unused_engine_files_and_keeps_held_young_and_foreign_ones(tmp_path):
    orphan = old(tmp_path / "psm_dead0001")
    sem = old(tmp_path / "sem.mp-dead0002")
    held = old(tmp_path / "psm_live0003")
    young = tmp_path / "psm_young0004"
    young.write_bytes(b"x")
    other = old(tmp_path / "torch_12345")
    with open(held, "rb"):
        assert held.stat().st_ino in in_use(tmp_path)
        removed = clean_orphans(tmp_path)
    assert sorted(removed) == ["psm_dead0001", "sem.mp-dead0002"]
    assert not orphan.exists() and not sem.exists()
    assert held.exists() and young.exists() and other.exists()


def test_since_limits_cleanup_to_files_changed_after_it(tmp_path):
    before = old(tmp_path / "psm_before01", age_s=120)
    after = old(tmp_path / "psm_after002", age_s=30)
    assert orphans(tmp_path, since=time.time() - 60) == [after]
    assert before.exists()


def test_shared_memory_of_a_sigkilled_process_is_removed():
    child = subprocess.Popen([sys.executable, "-c", (
        "from multiprocessing import shared_memory, resource_tracker; import sys, time\n"
        "shm = shared_memory.SharedMemory(create=True, size=4096)\n"
        "resource_tracker.unregister(shm._name, 'shared_memory')\n"  # as a killed tracker would
        "print(shm.name, flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    name = child.stdout.readline().strip().lstrip("/")
    path = Path("/dev/shm") / name
    try:
        assert path.exists()
        assert path.stat().st_ino in in_use()  # the live child maps it
        assert name not in clean_orphans(since=time.time() - 60, min_age_s=0)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert path.exists()  # left behind by the killed process
        assert name in clean_orphans(since=time.time() - 60, min_age_s=0)
        assert not path.exists()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        path.unlink(missing_ok=True)


def test_a_live_named_semaphore_counts_as_in_use():
    import multiprocessing

    lock = multiprocessing.get_context("spawn").Lock()  # sem_open maps it under a temp name
    path = Path("/dev/shm") / ("sem." + lock._semlock.name.lstrip("/"))
    assert path.exists() and path.stat().st_ino in in_use()
    assert path not in orphans(since=time.time() - 60, min_age_s=0)
