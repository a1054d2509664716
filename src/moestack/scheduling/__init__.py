"""Scheduling: when a request runs.

A weighted, token-based fair queue per model across tenants (:mod:`.fair_queue`), sized from the
replicas' batch (:mod:`.capacity`), its virtual token counters merged across the gateway
replicas (:mod:`.shared_counters`), the requests waiting at the gateways reported to the
autoscaler (:mod:`.queue_depth`), and a prediction of each request's wait. :class:`Scheduler` is
the interface the request path calls, through the :class:`~moestack.scheduling.hook.Scheduling`
hook. Tenants are names with a weight and a tier: nothing here reads tenancy.
"""

from moestack.scheduling.scheduler import FairnessView, Scheduler

__all__ = ["FairnessView", "Scheduler"]
