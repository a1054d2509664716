"""ModelServer: the Ray Serve deployment that runs one engine per replica."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from moestack.config.schema import ModelConfig
from moestack.engine import build_engine
from moestack.engine.protocol import EngineChunk, EngineInfo, EngineRequest, EngineStats
from moestack.engine.replica_adapters import ReplicaAdapters
from moestack.routing.types import ReplicaTarget
from moestack.scheduling.queue_depth import QueueDepthClient
from moestack.serve.autoscaling import (
    GATEWAY_QUEUE_METRIC,
    KV_CACHE_METRIC,
    TTFT_METRIC,
    TtftWindow,
)
from moestack.serve.coalesce import coalesce
from moestack.serve.placement import verify_replica_placement
from moestack.serve.shm import clean_orphans


class ModelServer:
    """One replica: builds and starts the engine the model config names."""

    async def __init__(self, model_config: dict[str, Any], cache_dir: str | None = None):
        from ray import serve

        clean_orphans()  # /dev/shm files of a replica that was killed here (moestack.serve.shm)
        self.config = ModelConfig.model_validate(model_config)
        verify_replica_placement(self.config)
        self.engine = build_engine(self.config, Path(cache_dir) if cache_dir else None)
        await self.engine.start()
        self.adapters = ReplicaAdapters(self.engine)
        self.ttft = TtftWindow()
        self.queue_depth = QueueDepthClient(serve.get_replica_context().app_name, create=False)
        self.served = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    async def serve(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """The engine's answer, chunk by chunk (the engine protocol's contract; chunks produced
        together leave together, :mod:`moestack.serve.coalesce`); a request
        naming an adapter first loads it if this replica does not hold it (the wait counts in
        its time to first token)."""
        started, last = time.monotonic(), None
        if request.adapter is not None:
            await self.adapters.ensure(request.adapter)
        try:
            async for chunk in coalesce(self.engine.serve(request)):
                if last is None:
                    self.ttft.record(time.monotonic() - started)
                    self.served["requests"] += 1
                last = chunk
                yield chunk
        finally:
            if last is not None:
                self.served["prompt_tokens"] += last.usage.prompt_tokens
                self.served["cached_prompt_tokens"] += last.usage.cached_prompt_tokens

    def info(self) -> EngineInfo:
        """What the engine serves: routes and their fields, context length, priority mode."""
        return self.engine.info

    def replica_report(self, target: ReplicaTarget | None = None) -> dict[str, Any]:
        """Which replica this is, what it served (requests, prompt and cached tokens), the
        adapter loads it made and the adapters it holds; ``target`` pins the call to one
        replica (the request router reads it)."""
        from ray import serve

        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.served,
                "adapter_loads": dict(self.adapters.loads),
                "adapters": sorted(self.engine.stats().adapters)}

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray Serve every ``request_routing_stats_period_s``; the answer reaches every
        handle's request router (adapter affinity, :mod:`moestack.routing.adapters`)."""
        return {"adapters": sorted(self.engine.stats().adapters)}

    async def remove_adapter(self, name: str, target: ReplicaTarget | None = None) -> str:
        """Unload adapter ``name`` here; ``target`` pins the call to one replica (the request
        router reads it). Returns this replica's id, so the caller sees which ones it reached."""
        from ray import serve

        await self.adapters.remove(name)
        return serve.get_replica_context().replica_id.unique_id

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Per-replica custom metrics Ray Serve hands to the autoscaling policy; the gateways'
        queue depth for this model is the same on every replica (the policy takes the max)."""
        stats = {KV_CACHE_METRIC: self.engine.stats().kv_cache_usage_ratio}
        if (ttft := self.ttft.mean()) is not None:
            stats[TTFT_METRIC] = ttft
        if self.config.autoscaling.count_gateway_queue and (
                queued := await self.queue_depth.waiting(self.config.name)) is not None:
            stats[GATEWAY_QUEUE_METRIC] = queued
        return stats

    async def check_health(self) -> None:
        """Called by Ray Serve periodically; raising marks the replica unhealthy."""
        await self.engine.check_health()

    async def health(self) -> None:
        """Same probe, callable through a handle by the gateway's /health."""
        await self.engine.check_health()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
