"""Replica routing: LLM-aware policies behind one interface, chosen by name in config.

A policy is filters -> weighted scorers (each in [0, 1]) -> a picker (:mod:`.plugins`), built
from ``ModelConfig.routing`` through the :data:`POLICIES` registry (:mod:`.policy`). The
:class:`Router` (:mod:`.router`) keeps the state policies read (outstanding tokens, prefix
index); Ray Serve runs it as the ModelServer deployment's request router (:mod:`.ray_router`),
and :mod:`.replica_set` runs it over in-process engines (tests, the routing benchmark).
"""

from moestack.routing.policy import POLICIES, Pipeline, register_policy
from moestack.routing.router import Router
from moestack.routing.types import ReplicaState, RoutingRequest

__all__ = ["POLICIES", "Pipeline", "ReplicaState", "Router", "RoutingRequest",
           "register_policy"]
