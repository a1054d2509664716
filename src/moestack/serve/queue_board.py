"""Gateway fair-queue depth per model, made visible to the ModelServer autoscaler.

Requests waiting in a gateway replica's tenant fair queue (:mod:`moestack.tenancy.fair`) have not
reached Ray Serve yet, so Serve's request counts miss them. Each gateway replica reports its
waiting requests per model to one small named actor per application, the board, every
``REPORT_INTERVAL_S``; each ModelServer replica reads its model's total from the board whenever
Serve collects autoscaling stats, and the policy adds it to the load
(:mod:`moestack.serve.autoscaling`).

The board belongs to the gateway replica that created it: if that replica goes away, the next
report of another one creates a new board. A gateway that stopped reporting (killed) drops out
of the sum after ``STALE_AFTER_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time

NAMESPACE = "moestack"
REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 10.0
CALL_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


class QueueBoard:
    """Latest report of every gateway replica: waiting requests per model."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict[str, int]]] = {}

    def report(self, gateway_id: str, waiting: dict[str, int],
               now_s: float | None = None) -> None:
        self._reports[gateway_id] = (time.monotonic() if now_s is None else now_s, dict(waiting))

    def waiting(self, model: str, now_s: float | None = None) -> int:
        """Requests waiting for ``model`` summed over the gateways that reported lately."""
        now_s = time.monotonic() if now_s is None else now_s
        for gone in [g for g, (t, _) in self._reports.items() if now_s - t > STALE_AFTER_S]:
            del self._reports[gone]
        return sum(waiting.get(model, 0) for _, waiting in self._reports.values())


def board_name(app_name: str) -> str:
    return f"queue-board:{app_name}"


class BoardClient:
    """A replica's connection to its application's board, found again after it was lost.

    Gateways create the board if it is missing; ModelServers only read it (no board: nothing is
    queued at any gateway, e.g. tenancy off). Subclasses set ``actor_cls`` and ``name`` for
    other boards (``moestack.serve.fair_board``).
    """

    actor_cls: type = QueueBoard

    def __init__(self, app_name: str, create: bool):
        self.name, self.create = board_name(app_name), create
        self._actor = None
        self._warned = False

    async def _board(self):
        import ray

        if self._actor is None:
            if self.create:
                actor_cls = ray.remote(num_cpus=0)(self.actor_cls)
                self._actor = await asyncio.to_thread(lambda: actor_cls.options(
                    name=self.name, namespace=NAMESPACE, get_if_exists=True).remote())
            else:
                try:
                    self._actor = await asyncio.to_thread(ray.get_actor, self.name, NAMESPACE)
                except ValueError:  # not created yet
                    return None
        return self._actor

    async def _call(self, method: str, *args):
        try:
            board = await self._board()
            if board is None:
                return None
            result = await asyncio.wait_for(getattr(board, method).remote(*args),
                                            CALL_TIMEOUT_S)
            self._warned = False
            return result
        except Exception as exc:  # noqa: BLE001 - board lost or slow: find it again next time
            self._actor = None
            if not self._warned:
                self._warned = True
                log.warning("board %s: %s: %s", self.name, method, type(exc).__name__)
            return None

    async def report(self, gateway_id: str, waiting: dict[str, int]) -> None:
        await self._call("report", gateway_id, waiting)

    async def waiting(self, model: str) -> int | None:
        """Requests waiting at the gateways for ``model``; None when the board is unreachable."""
        return await self._call("waiting", model)
