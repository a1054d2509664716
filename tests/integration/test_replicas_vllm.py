"""Two replicas of a tiny real vLLM model (Mixtral-shaped: MLA models disable prefix caching on
CPU) behind the prefix-affinity router: repeats of a prompt family go where the family was
prefilled and hit vLLM's prefix cache. One Ray cluster and one deployment for the module."""

import json
import shutil

import pytest

from moestack.testing import fake_config
from moestack.testing.requests import engine_request
from moestack.testing.stack_process import free_port, short_temp_dir

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"


@pytest.fixture(scope="module")
def deployment():
    import ray
    from ray import serve

    from moestack.engine.source import resolve_checkpoint
    from moestack.serve.app import model_server_app
    from moestack.serve.backend import ServeBackend

    tmp = short_temp_dir()
    config = fake_config({
        "name": MODEL, "tiny": {"arch": "mixtral", "seed": 0},
        "architecture": "MixtralForCausalLM", "max_model_len": 512, "num_replicas": 2,
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "engine_args": {"enforce_eager": True, "enable_prefix_caching": True},
        "routing": {"policy": "prefix_affinity", "prefix_block_chars": 32}})
    model = config.models[0]
    resolve_checkpoint(model, None)  # build the tiny checkpoint once, here, not per replica
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
             logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(model_server_app(model, None), name="vllm-replicas",
                           route_prefix=None)
        yield handle, ServeBackend({MODEL: handle})
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_prefix_affinity_sends_repeats_of_a_prompt_family_to_its_cached_replica(deployment):
    _, backend = deployment
    families = [" ".join(f"The {w} of family {f} is long and shared." for w in range(20))
                for f in range(2)]
    cached, prompt = {0: [], 1: []}, {0: [], 1: []}
    for i in range(8):
        f = i % 2
        request = engine_request({"model": MODEL, "prompt": f"{families[f]} Question {i}?",
                                  "max_tokens": 4, "temperature": 0}, request_id=f"v{i}",
                                 max_model_len=512)
        chunks = [c async for c in backend.serve(MODEL, request)]
        assert chunks[0].status == 200, chunks[0].data
        usage = json.loads(b"".join(c.data for c in chunks))["usage"]
        last = chunks[-1].usage  # the engine's own count, metered in the replica
        assert (last.prompt_tokens, last.completion_tokens) == (
            usage["prompt_tokens"], usage["completion_tokens"])
        cached[f].append(last.cached_prompt_tokens)
        prompt[f].append(last.prompt_tokens)
    for f in (0, 1):
        assert cached[f][0] == 0
        assert all(c >= p // 2 for c, p in zip(cached[f][1:], prompt[f][1:])), (cached, prompt)
