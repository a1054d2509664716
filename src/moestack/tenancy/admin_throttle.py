"""Admin key checks: the key's minimum length at start, and throttling of failed attempts.

A client address that fails admin authentication ``max_failures`` times within ``window_s``
gets 429 with ``Retry-After`` (until its oldest failure in the window expires) before its key is
even compared, so guessing the admin key costs one window per ``max_failures`` guesses. Memory
is bounded: at most ``max_failures`` timestamps per client, at most ``max_clients`` clients
(the least recently failing ones are forgotten first).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from moestack.errors import ConfigError

MIN_ADMIN_KEY_CHARS = 32


def check_admin_key(env: str) -> None:
    """Refuse to start with an admin key shorter than :data:`MIN_ADMIN_KEY_CHARS` (an unset
    key is allowed: the admin API then stays off). The message never contains the key."""
    key = os.environ.get(env, "")
    if key and len(key) < MIN_ADMIN_KEY_CHARS:
        raise ConfigError(f"the admin key in ${env} has {len(key)} characters; it needs at least "
                          f"{MIN_ADMIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)")


class AdminAuthThrottle:
    """Failed admin authentications per client address, in a sliding window."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0,
                 max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after_s(self, client: str) -> int | None:
        """Whole seconds until ``client`` may try again, or None if it is not throttled."""
        now = self._clock()
        with self._lock:
            times = self._failures.get(client)
            if times is None:
                return None
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if not times:
                del self._failures[client]
                return None
            if len(times) < self.max_failures:
                return None
            return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        with self._lock:
            times = self._failures.pop(client, None)
            if times is None:
                times = deque(maxlen=self.max_failures)
            times.append(self._clock())
            self._failures[client] = times  # most recent at the end
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def __len__(self) -> int:
        return len(self._failures)
