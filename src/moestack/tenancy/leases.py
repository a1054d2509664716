"""Leases of in-flight ledger rows: how long one runs, how often it is renewed and swept.

``tenancy.lease_s`` is the promise: a row whose gateway died (SIGKILL, OOM, a node lost) is
closed as ``lost`` within ``lease_s`` of the death, keeping its reservation as the charge and
leaving its tenant's in-flight count. To keep it:

- a row's lease runs :func:`row_lease_s` (two thirds of ``lease_s``) from its admission or its
  last renewal, and its gateway renews it every :func:`beat_interval_s` (a sixth), so a renewal
  may come half of ``lease_s`` late (a store stall) before a live request's row expires;
- every live gateway closes the expired rows of *any* gateway at the same beat
  (:func:`moestack.tenancy.ledger.close_lost`), and ``moestack up`` runs a :class:`LeaseSweeper`
  doing the same from its own process, so the rows close even while no gateway is left (the
  only one was killed and its successor is starting): at most 2/3 + 1/6 of ``lease_s`` after
  the death.

A row closed as ``lost`` while its request still runs (a store stall longer than the margin) is
settled with the real figures when the request ends, as any late settlement.
"""

from __future__ import annotations

import logging
import threading

from moestack.errors import StoreUnavailableError
from moestack.tenancy import ledger
from moestack.tenancy.store import TenancyStore

log = logging.getLogger(__name__)

ROW_LEASE_FRACTION = 2 / 3
BEAT_FRACTION = 1 / 6


def row_lease_s(lease_s: float) -> float:
    """How far ahead an admission or a renewal sets a row's lease."""
    return lease_s * ROW_LEASE_FRACTION


def beat_interval_s(lease_s: float) -> float:
    """How often a gateway renews its rows' leases and every sweeper closes expired rows."""
    return lease_s * BEAT_FRACTION


def close_expired(store: TenancyStore) -> int:
    """Close every row whose lease ran out, of any gateway, in batches; returns how many."""
    closed = 0
    while True:
        with store.begin() as conn:
            n = ledger.close_lost(conn)
        closed += n
        if n < ledger.CLOSE_BATCH_ROWS:
            return closed


class LeaseSweeper:
    """Closes expired rows every :func:`beat_interval_s` from a thread of its own, so they close
    whether or not a gateway is alive. :meth:`start` / :meth:`stop`."""

    def __init__(self, store: TenancyStore, lease_s: float):
        self.store, self.interval_s = store, beat_interval_s(lease_s)
        self.closed = 0
        """Rows this sweeper closed as ``lost``."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moestack-lease-sweeper",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                n = close_expired(self.store)
            except StoreUnavailableError:
                # Fail open on purpose: the next beat tries again, and the gateways sweep too.
                log.warning("lease sweeper: store unavailable; retrying in %.1f s",
                            self.interval_s)
                continue
            if n:
                self.closed += n
                log.info("closed %d ledger rows of dead gateways as lost", n)
