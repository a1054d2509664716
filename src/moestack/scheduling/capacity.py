"""How many requests one gateway replica sends to a model at once, from the replicas' batch size.

The fair queue (:mod:`moestack.scheduling.fair_queue`) holds only what the model's replicas
cannot take: its dispatch slots are what the live replicas run in one batch (vLLM's
``max_num_seqs``) plus ``tenancy.fair_queue.headroom_ratio``, shared by the gateway replicas,
and of that batch ``reserve_batch_slots_per_replica`` per replica are kept for tenants below
their share. A fixed ``max_inflight_requests_per_model`` replaces the whole computation. Pure
functions of the config and the live replica count (:meth:`Scheduler.follow_replicas
<moestack.scheduling.scheduler.Scheduler.follow_replicas>` feeds the latter).
"""

from __future__ import annotations

import math

from moestack.config.schema import MoestackConfig


def batch_slots(config: MoestackConfig, model: str) -> int:
    """Requests one replica of ``model`` runs in one batch (see ``FairQueueConfig``)."""
    m = config.model(model)
    return (config.tenancy.fair_queue.batch_slots_per_replica
            or m.engine_args.get("max_num_seqs") or m.fake.max_num_seqs
            or m.max_ongoing_requests)


def replicas(config: MoestackConfig, model: str, live_replicas: int | None) -> int:
    """The model's live replicas, or its initial ones; at least one (scaled to zero, the first
    requests must reach Ray Serve to start one)."""
    return max(1, config.model(model).initial_replicas if live_replicas is None
               else live_replicas)


def dispatch_slots(config: MoestackConfig, model: str, live_replicas: int | None = None) -> int:
    """This gateway replica's fair-queue slots for ``model``: the configured number, else what
    the model's replicas (live, or the initial ones) run in one batch plus the headroom, shared
    by the gateway replicas. A model scaled to zero gets one replica's worth, so the first
    requests reach Ray Serve and start it."""
    fair = config.tenancy.fair_queue
    if fair.max_inflight_requests_per_model is not None:
        return fair.max_inflight_requests_per_model
    total = math.ceil(replicas(config, model, live_replicas) * batch_slots(config, model)
                      * (1 + fair.headroom_ratio))
    return max(1, -(-total // config.gateway.num_replicas))


def reserve(config: MoestackConfig, model: str,
            live_replicas: int | None = None) -> tuple[int, int]:
    """(batch slots, reserved batch slots) of this gateway replica for ``model``: the replicas'
    batch and ``reserve_batch_slots_per_replica`` of each, shared by the gateway replicas
    (rounded up: each gateway keeps at least one when there is a reserve). With a fixed
    ``max_inflight_requests_per_model`` the batch is that number."""
    fair = config.tenancy.fair_queue
    n = replicas(config, model, live_replicas)
    gateways = config.gateway.num_replicas
    if fair.max_inflight_requests_per_model is not None:
        batch = fair.max_inflight_requests_per_model
    else:
        batch = max(1, -(-n * batch_slots(config, model) // gateways))
    held = -(-n * fair.reserve_batch_slots_per_replica // gateways)
    return batch, min(held, batch - 1)
