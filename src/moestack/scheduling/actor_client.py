"""A gateway's or model server's connection to a small named Ray actor of its application.

The scheduling room keeps two kinds of soft state in such actors: the requests waiting at the
gateways (:mod:`.queue_depth`) and the fair queue's virtual token counters
(:mod:`.shared_counters`). Both are found by name, created by the gateways when missing, found
again after they were lost, and never waited on for long: a call that fails or takes longer
than :data:`CALL_TIMEOUT_S` answers None and the caller carries on without (no request waits
on them).
"""

from __future__ import annotations

import asyncio
import logging

NAMESPACE = "moestack"
CALL_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


class ActorClient:
    """Calls one named actor of class ``actor_cls``; ``create``: make it when it is missing
    (else a missing actor answers None)."""

    actor_cls: type

    def __init__(self, name: str, create: bool):
        self.name, self.create = name, create
        self._actor = None
        self._warned = False

    async def _handle(self):
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
            actor = await self._handle()
            if actor is None:
                return None
            result = await asyncio.wait_for(getattr(actor, method).remote(*args),
                                            CALL_TIMEOUT_S)
            self._warned = False
            return result
        except Exception as exc:  # noqa: BLE001 - actor lost or slow: find it again next time
            self._actor = None
            if not self._warned:
                self._warned = True
                log.warning("actor %s: %s: %s", self.name, method, type(exc).__name__)
            return None
