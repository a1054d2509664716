"""Throttling of failed authentications, for tenant keys and the admin key.

:class:`FailedAuthThrottle` is the one throttle of failed authentications, per client address,
in a sliding window; two listeners use it:

* the admin API (operator port, :mod:`moestack.api.admin.key`): an address that fails ``admin_auth_max_failures`` times within
  ``admin_auth_window_s`` gets 429 with ``Retry-After`` (until its oldest failure in the window
  expires) before its key is even compared, so guessing the admin key costs one window per
  ``max_failures`` guesses;
* tenant keys on the public API (``auth_max_failures`` / ``auth_window_s``, see
  :class:`~moestack.tenancy.auth_cache.AuthCache`): a throttled address gets 429 before any key
  lookup, so random key ids cannot make every request read the store.

Memory is bounded: at most ``max_failures`` timestamps per client, at most ``max_clients``
clients (the least recently failing ones are forgotten first).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

class FailedAuthThrottle:
    """Failed authentications per client address, in a sliding window."""

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
