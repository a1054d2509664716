"""Tenant fairness on the tiny vLLM model (Mixtral-shaped, CPU): two gateway replicas sharing their
virtual token counters in front of one replica with a 16-slot batch and vLLM's priority scheduler,
over HTTP. The fake-engine suite (test_fairness_replicas.py) covers the other cases; figures:
benchmarks/fairness.py --engine vllm."""

import asyncio

import pytest

from moestack.config import parse_config
from moestack.engine.source import resolve_checkpoint
from moestack.loadtest import jain_index
from moestack.testing.fair_load import closed_loop, deploy, serve_cluster

pytestmark = pytest.mark.integration

MODEL = "fair-vllm"
WEIGHTS = {"one": 1.0, "three": 3.0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    config = parse_config({
        "models": [{"name": MODEL, "tiny": {"arch": "mixtral", "seed": 0},
                    "architecture": "MixtralForCausalLM", "max_model_len": 512,
                    "max_ongoing_requests": 32,
                    "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                    "engine_args": {"max_num_seqs": 16, "scheduling_policy": "priority",
                                    "enforce_eager": True}}],
        "gateway": {"num_replicas": 2},
        "storage": {"url": f"sqlite:///{tmp_path_factory.mktemp('fair-vllm')}/fair.db"},
        "tenancy": {"enabled": True, "bootstrap_tenant": None}})
    resolve_checkpoint(config.models[0], None)  # build the tiny checkpoint here, once
    with serve_cluster() as port, deploy(port, config, "fair-vllm", WEIGHTS) as deployed:
        yield deployed


def test_tokens_follow_weights_1_3_under_overload_across_two_gateways(stack):
    # 32 closed-loop workers per tenant for 16 batch slots (plus headroom): unweighted, each
    # tenant would get half of the tokens.
    window = asyncio.run(closed_loop(stack, {"one": 32, "three": 32}, 8.0, MODEL, (8, 24),
                                     ramp_s=6.0))
    tokens = {t: stack.tokens(t, *window) for t in WEIGHTS}
    total = sum(tokens.values())
    assert total > 0
    shares = {t: n / total for t, n in tokens.items()}
    assert shares["one"] < shares["three"], shares
    assert jain_index([shares[t] / (WEIGHTS[t] / 4) for t in shares]) >= 0.9, shares
