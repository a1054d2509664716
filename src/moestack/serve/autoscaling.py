"""Autoscaling of ModelServer replicas on LLM signals, as a Ray Serve custom autoscaling policy.

:func:`decide` is the policy: a pure function of a :class:`ScalingContext` (signals, config, the
state it returned last time) that returns ``(replicas, debug)``; ``debug`` is also the state for
the next call. It is tested on recorded signal traces. :class:`LLMAutoscalingPolicy` adapts it to
Ray Serve's ``AutoscalingContext``, whose per-replica custom metrics come from
:meth:`ModelServer.record_autoscaling_stats` (KV-cache usage, recent time to first token).

Signals and rules:

* load = Serve's ongoing requests of the deployment (running on replicas plus queued at the
  gateways' handles) plus the requests waiting in the gateways' tenant fair queues, which Serve
  does not see (reported through :mod:`moestack.scheduling.queue_depth`). Wanted replicas =
  ceil(load / target_ongoing_requests).
* KV-cache usage above ``kv_cache_high_ratio``, or mean TTFT above ``ttft_slo_s``, add one replica.
* Hysteresis: scale-down needs the load to fit ``target * scale_down_load_ratio`` per remaining
  replica, KV usage under ``kv_cache_low_ratio`` and TTFT within the SLO, all for
  ``downscale_delay_s``; scale-up waits ``upscale_delay_s``. A change of direction resets the wait.
* Scale to zero (``min_replicas: 0``) after ``scale_to_zero_delay_s`` without load; from zero, the
  first request is held in the gateway's handle queue and scales up at once (cold start).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from moestack.config.schema import ModelConfig, ReplicaAutoscalingConfig
from moestack.routing.ray_router import request_router_config

KV_CACHE_METRIC = "kv_cache_usage_ratio"
TTFT_METRIC = "ttft_s"
GATEWAY_QUEUE_METRIC = "gateway_queued_requests"


@dataclass(frozen=True)
class ScalingSignals:
    """What the autoscaler sees at one tick."""

    now_s: float
    current_replicas: int
    ongoing_requests: float
    """Running on replicas plus queued at handles, summed over the deployment."""
    kv_cache_usage_ratio: float | None = None
    """Mean over replicas, 0 to 1; None when no replica reported it."""
    ttft_s: float | None = None
    """Mean time to first token of recent requests over replicas; None without requests."""
    gateway_queued_requests: float = 0.0
    """Waiting in the gateways' fair queues for this model, not yet handed to Serve."""

    @property
    def load(self) -> float:
        return max(0.0, self.ongoing_requests) + max(0.0, self.gateway_queued_requests)


@dataclass(frozen=True)
class ScalingContext:
    signals: ScalingSignals
    config: ReplicaAutoscalingConfig
    state: dict[str, Any] = field(default_factory=dict)


def _wanted(ctx: ScalingContext) -> tuple[int, list[str]]:
    s, cfg = ctx.signals, ctx.config
    cur, load = s.current_replicas, s.load
    if cur == 0:
        return (max(1, math.ceil(load / cfg.target_ongoing_requests)), ["cold start"]) \
            if load > 0 else (0, [])
    wanted, reasons = cur, []
    need = math.ceil(load / cfg.target_ongoing_requests)
    if need > cur:
        wanted, reasons = need, [f"load {load:g} > {cur} x {cfg.target_ongoing_requests:g}"]
    kv = s.kv_cache_usage_ratio
    kv_high = kv is not None and kv > cfg.kv_cache_high_ratio
    slow = cfg.ttft_slo_s is not None and s.ttft_s is not None and s.ttft_s > cfg.ttft_slo_s
    if kv_high:
        wanted = max(wanted, cur + 1)
        reasons.append(f"kv cache {s.kv_cache_usage_ratio:.2f} > {cfg.kv_cache_high_ratio:g}")
    if slow:
        wanted = max(wanted, cur + 1)
        reasons.append(f"ttft {s.ttft_s:.3g} s > slo {cfg.ttft_slo_s:g} s")
    if wanted > cur:
        return wanted, reasons
    if load == 0 and cfg.min_replicas == 0:
        return 0, ["idle"]
    fits = max(1, math.ceil(load / (cfg.target_ongoing_requests * cfg.scale_down_load_ratio)))
    kv_low = s.kv_cache_usage_ratio is None or s.kv_cache_usage_ratio < cfg.kv_cache_low_ratio
    if fits < cur and kv_low and not slow:
        return fits, [f"load {load:g} fits {fits} replica(s) below the hysteresis band"]
    return cur, []


def decide(ctx: ScalingContext) -> tuple[int, dict[str, Any]]:
    """The policy: ``(replicas, debug)``; feed ``debug`` back as ``state`` on the next tick."""
    s, cfg = ctx.signals, ctx.config
    cur = s.current_replicas
    wanted, reasons = _wanted(ctx)
    wanted = min(cfg.max_replicas, max(cfg.min_replicas, wanted))
    debug: dict[str, Any] = {"wanted": wanted, "reasons": reasons,
                             "up_since_s": None, "down_since_s": None}
    if wanted > cur:
        since = _since(ctx.state, "up_since_s", s.now_s)
        if cur == 0 or s.now_s - since >= cfg.upscale_delay_s:
            return wanted, debug
        debug["up_since_s"] = since
    elif wanted < cur:
        since = _since(ctx.state, "down_since_s", s.now_s)
        delay = cfg.scale_to_zero_delay_s if wanted == 0 else cfg.downscale_delay_s
        if s.now_s - since >= delay:
            return wanted, debug
        debug["down_since_s"] = since
    return cur, debug


def _since(state: dict[str, Any], key: str, now_s: float) -> float:
    since = state.get(key)
    return now_s if since is None else since


def _values(per_replica: dict | None) -> list[float]:
    return [v for v in (per_replica or {}).values() if v is not None and not math.isnan(v)]


def _mean(per_replica: dict | None) -> float | None:
    values = _values(per_replica)
    return sum(values) / len(values) if values else None


class LLMAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (a class: Serve passes ``policy_kwargs``)."""

    def __init__(self, **config: Any):
        self.config = ReplicaAutoscalingConfig.model_validate(config)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        queued = max(_values(metrics.get(GATEWAY_QUEUE_METRIC)), default=0.0) \
            if self.config.count_gateway_queue else 0.0
        signals = ScalingSignals(
            now_s=ctx.current_time if ctx.current_time is not None else time.time(),
            current_replicas=ctx.current_num_replicas,
            ongoing_requests=float(ctx.total_num_requests or 0.0),
            kv_cache_usage_ratio=_mean(metrics.get(KV_CACHE_METRIC)),
            ttft_s=_mean(metrics.get(TTFT_METRIC)),
            # Every replica reads the same gateway total; the largest is the freshest rise.
            gateway_queued_requests=queued)
        return decide(ScalingContext(signals, self.config, dict(ctx.policy_state or {})))


def scaling_options(model: ModelConfig) -> dict[str, Any]:
    """``Deployment.options`` for routing, autoscaling and drain, merged over placement's."""
    cfg = model.autoscaling
    options: dict[str, Any] = {
        "request_router_config": request_router_config(model),
        # Drain: a replica leaving (scale-down, rollout) takes no new request and finishes the
        # ones it has, for up to this long, before it is stopped.
        "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if cfg.enabled:
        options["num_replicas"] = None
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": cfg.initial_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "look_back_period_s": cfg.look_back_period_s,
            # Delays and hysteresis are decide()'s: Serve's own must not add to them.
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "downscale_to_zero_delay_s": 0.0,
            "policy": {"policy_function": f"{__name__}:{LLMAutoscalingPolicy.__name__}",
                       "policy_kwargs": cfg.model_dump(mode="json")},
        }
    return options


class TtftWindow:
    """Times to first token of the last ``window_s`` seconds, for the autoscaling metric."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def record(self, ttft_s: float, now_s: float | None = None) -> None:
        self._samples.append((time.monotonic() if now_s is None else now_s, ttft_s))

    def mean(self, now_s: float | None = None) -> float | None:
        now_s = time.monotonic() if now_s is None else now_s
        while self._samples and self._samples[0][0] < now_s - self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        return sum(t for _, t in self._samples) / len(self._samples)
