"""Requests waiting in the gateways' fair queues per model, made visible to the autoscaler.

Requests waiting in a gateway replica's fair queue (:mod:`moestack.scheduling.fair_queue`) have
not reached Ray Serve yet, so Serve's request counts miss them. Each gateway replica reports its
waiting requests per model to one small named actor per application, the
:class:`QueueDepthBoard`, every ``REPORT_INTERVAL_S``; each ModelServer replica reads its model's
total from it whenever Serve collects autoscaling stats, and the policy adds it to the load
(:mod:`moestack.serve.autoscaling`).

The board belongs to the gateway replica that created it: if that replica goes away, the next
report of another one creates a new board. A gateway that stopped reporting (killed) drops out
of the sum after ``STALE_AFTER_S``.
"""

from __future__ import annotations

import time

from moestack.scheduling.actor_client import ActorClient

REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 10.0


class QueueDepthBoard:
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


def queue_depth_board_name(app_name: str) -> str:
    return f"queue-depth:{app_name}"


class QueueDepthClient(ActorClient):
    """A replica's connection to its application's queue-depth board. Gateways create the board
    if it is missing; ModelServers only read it (no board: nothing is queued at any gateway,
    e.g. tenancy off)."""

    actor_cls = QueueDepthBoard

    def __init__(self, app_name: str, create: bool):
        super().__init__(queue_depth_board_name(app_name), create)

    async def report(self, gateway_id: str, waiting: dict[str, int]) -> None:
        await self._call("report", gateway_id, waiting)

    async def waiting(self, model: str) -> int | None:
        """Requests waiting at the gateways for ``model``; None when the board is unreachable."""
        return await self._call("waiting", model)
