"""`moestack up` always stops: SIGINT works even when the process started with it ignored, and a
stop that hangs (Ray's shutdown, or a thread left behind at interpreter exit) ends the process
anyway, with exit code 1 and a message."""

import signal
import subprocess
import sys

HANGS_AT_EXIT = """
import threading
from moestack.serve.runner import exit_if_stuck
threading.Thread(target=threading.Event().wait).start()  # never ends: the exit waits for it
exit_if_stuck(0.3, lambda m: print(m, flush=True))
"""

ENDS = """
from moestack.serve.runner import exit_if_stuck
exit_if_stuck(30, print)
print("done")
"""


def test_a_stop_that_hangs_ends_the_process_with_a_message():
    out = subprocess.run([sys.executable, "-c", HANGS_AT_EXIT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "did not stop within 0.3 s; exiting anyway" in out.stdout


def test_a_stop_that_ends_is_not_cut_short():
    out = subprocess.run([sys.executable, "-c", ENDS], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "done\n")


WAITS_FOR_A_STOP = """
import time
from moestack.serve.runner import take_stop_signals
take_stop_signals()
try:  # "ready" inside: the signal may come before the next bytecode
    print("ready", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("stopping", flush=True)
"""


def test_sigint_stops_a_stack_started_with_sigint_ignored():
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored.
    proc = subprocess.Popen([sys.executable, "-c", WAITS_FOR_A_STOP], stdout=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                         signal.SIG_IGN))
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0 and proc.stdout.read() == "stopping\n"
    finally:
        proc.kill()
