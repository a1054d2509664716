"""When a request runs, at one gateway replica: the interface the request path calls.

:class:`Scheduler` keeps one fair queue (:mod:`.fair_queue`) per model, sized from the model's
replicas (:mod:`.capacity`) and resized as they change (:meth:`Scheduler.follow_replicas`); it
merges the queues' virtual token counters with the other gateway replicas'
(:mod:`.shared_counters`) from :meth:`Scheduler.start` to :meth:`Scheduler.stop`. The request
path takes a slot (:meth:`Scheduler.acquire`) and releases it with the real token count; metrics
read :meth:`Scheduler.fairness` and :meth:`Scheduler.waiting`; :meth:`Scheduler.predicted_wait_s`
says how long a tenant's next request would wait. It knows tenants by name, weight and tier only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass

from moestack.config.schema import MoestackConfig
from moestack.scheduling import capacity
from moestack.scheduling.fair_queue import FairQueue, Slot
from moestack.scheduling.shared_counters import CountersLink


@dataclass(frozen=True)
class FairnessView:
    """One model's fairness state as this gateway sees it."""

    counters: dict[str, float]
    """Virtual token counter per tenant (weighted tokens)."""
    token_shares: dict[str, float]
    """Share of the tokens served over the last minute per tenant."""
    weight_shares: dict[str, float]
    """Share of the weight among the active tenants: what ``token_shares`` should be."""
    shared: bool | None
    """Counters merged with the other gateways at the last sync; None: not shared."""


class Scheduler:
    """The fair queues of one gateway replica, one per model of ``config``."""

    def __init__(self, config: MoestackConfig):
        self.config = config
        self.settings = config.tenancy.fair_queue
        self.gateway_id = f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._queues: dict[str, FairQueue] = {}
        self._links: dict[str, CountersLink] = {}
        self._sync: asyncio.Task | None = None
        self.shared: dict[str, bool] = {}
        """Per model: whether the last sync with the shared counters succeeded."""

    def queue(self, model: str) -> FairQueue:
        if model not in self._queues:
            self._queues[model] = FairQueue(capacity.dispatch_slots(self.config, model),
                                            self.settings.priority_step_tokens,
                                            *capacity.reserve(self.config, model))
        return self._queues[model]

    # -- the request path -----------------------------------------------------------------------

    async def acquire(self, model: str, tenant: str, weight: float, tier: int,
                      tokens: int) -> Slot:
        """Wait for a dispatch slot of ``model`` in fair order; ``tokens``: an upper bound of
        the request's tokens. The slot carries the engine priority; release it once with the
        real token count."""
        return await self.queue(model).acquire(tenant, weight, tier, tokens)

    def predicted_wait_s(self, model: str, tenant: str, weight: float,
                         tier: int) -> float | None:
        """How long a new request of ``tenant`` for ``model`` would wait for its slot (see
        :meth:`FairQueue.predicted_wait_s`); None while unknown."""
        return self.queue(model).predicted_wait_s(tenant, weight, tier)

    # -- views and capacity -------------------------------------------------------------------

    def fairness(self, model: str) -> FairnessView:
        """Counters and shares of ``model``'s tenants, for the metrics."""
        queue = self.queue(model)
        shares, weight_shares = queue.shares()
        return FairnessView(queue.counters(), shares, weight_shares, self.shared.get(model))

    def waiting(self) -> dict[str, int]:
        """Requests waiting in the fair queue, per model."""
        return {m.name: self.queue(m.name).waiting() for m in self.config.models}

    def follow_replicas(self, model: str, live_replicas: int) -> None:
        """The model now has ``live_replicas``: resize its fair queue's slots to match."""
        self.queue(model).set_capacity(capacity.dispatch_slots(self.config, model, live_replicas),
                                       *capacity.reserve(self.config, model, live_replicas))

    # -- shared counters ----------------------------------------------------------------------

    def share_counters(self, links: dict[str, CountersLink]) -> None:
        """Merge each model's virtual token counters with the other gateway replicas through
        ``links[model]`` every ``sync_interval_s`` (from :meth:`start`), if
        ``tenancy.fair_queue.shared_counters`` is on."""
        if self.settings.shared_counters:
            self._links = dict(links)

    def start(self) -> None:
        """Start the sync with the shared counters, if any (idempotent)."""
        if self._links and (self._sync is None or self._sync.done()):
            self._sync = asyncio.get_running_loop().create_task(self._sync_counters())

    async def stop(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
            self._sync = None

    async def _sync_counters(self) -> None:
        while True:
            for model, link in self._links.items():
                queue = self.queue(model)
                merged = await link.sync(self.gateway_id, queue.sync_out())
                queue.sync_in(merged)  # None: lost, run on local counters until back
                self.shared[model] = merged is not None
            await asyncio.sleep(self.settings.sync_interval_s)
