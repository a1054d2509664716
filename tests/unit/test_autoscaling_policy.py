"""The autoscaling policy on recorded signal traces, and its wiring into Ray Serve's hook."""

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from moestack.config.schema import ModelConfig, ReplicaAutoscalingConfig
from moestack.serve.autoscaling import (
    LLMAutoscalingPolicy,
    ScalingContext,
    ScalingSignals,
    TtftWindow,
    decide,
    scaling_options,
)
from moestack.testing import fake_model


def replay(trace, start_replicas=1, **config):
    """Feed ``(t_s, ongoing, kv, ttft)`` rows through decide(); replicas follow each decision."""
    cfg = ReplicaAutoscalingConfig(enabled=True, **config)
    replicas, state, out = start_replicas, {}, []
    for t, ongoing, kv, ttft in trace:
        replicas, state = decide(ScalingContext(
            ScalingSignals(t, replicas, ongoing, kv, ttft), cfg, state))
        out.append(replicas)
    return out


# A burst recorded on a fake-engine deployment: idle, ramp to 30 ongoing requests, tail off.
BURST = [(t, load, 0.1, 0.2) for t, load in [
    (0, 0), (5, 2), (10, 9), (15, 17), (20, 30), (25, 31), (30, 29), (35, 30), (40, 12),
    (45, 6), (50, 4), (55, 3), (60, 3), (65, 2), (70, 2), (75, 1), (80, 0), (85, 0)]]


def test_scales_up_with_load_at_once_and_down_only_after_the_delay():
    replicas = replay(BURST, target_ongoing_requests=8, max_replicas=4, downscale_delay_s=20)
    assert replicas[:5] == [1, 1, 2, 3, 4]
    assert max(replicas) == 4
    first_low = 8  # t=40: 12 ongoing fit 3 replicas below the band (8 x 0.6 each)
    assert replicas[first_low:first_low + 4] == [4, 4, 4, 4]
    assert replicas[first_low + 4] == 1, replicas  # t=60, 20 s later: 3 ongoing fit one
    assert replicas[-1] == 1


def test_upscale_delay_waits_for_a_sustained_burst():
    trace = [(0, 40, None, None), (2, 2, None, None), (4, 40, None, None),
             (6, 40, None, None), (9, 40, None, None)]
    replicas = replay(trace, target_ongoing_requests=8, max_replicas=8, upscale_delay_s=5)
    assert replicas == [1, 1, 1, 1, 5]


def test_hysteresis_keeps_replicas_steady_while_load_hovers_at_the_target():
    hovering = [(t, 16 + (3 if t % 20 else -3), 0.3, None) for t in range(0, 600, 5)]
    replicas = replay(hovering, start_replicas=2, target_ongoing_requests=8, max_replicas=4,
                      downscale_delay_s=30)
    changes = sum(a != b for a, b in zip(replicas, replicas[1:]))
    assert changes <= 1 and replicas[-1] in (2, 3), replicas


def test_kv_cache_pressure_adds_a_replica_and_blocks_scale_down():
    trace = [(0, 4, 0.95, None), (5, 4, 0.7, None), (200, 4, 0.7, None), (400, 4, 0.3, None),
             (500, 4, 0.3, None)]
    replicas = replay(trace, target_ongoing_requests=8, max_replicas=4, downscale_delay_s=60)
    assert replicas == [2, 2, 2, 2, 1]


def test_ttft_over_the_slo_adds_replicas_one_at_a_time_up_to_max():
    trace = [(t, 5, 0.2, 3.0) for t in range(0, 50, 10)]
    replicas = replay(trace, target_ongoing_requests=8, max_replicas=3, ttft_slo_s=1.0)
    assert replicas == [2, 3, 3, 3, 3]


def test_scales_to_zero_when_idle_and_cold_starts_on_the_first_request():
    trace = [(0, 0, 0.0, None), (100, 0, 0.0, None), (301, 0, 0.0, None),
             (400, 0, None, None), (401, 1, None, None), (402, 1, 0.1, 0.5)]
    replicas = replay(trace, min_replicas=0, scale_to_zero_delay_s=300, upscale_delay_s=30)
    assert replicas == [1, 1, 0, 0, 1, 1]


def test_never_leaves_min_max_bounds():
    trace = [(t, load, None, None) for t, load in enumerate([0, 0, 500, 500, 0, 0])]
    replicas = replay(trace, start_replicas=2, min_replicas=2, max_replicas=5,
                      downscale_delay_s=0)
    assert replicas == [2, 2, 5, 5, 2, 2]


def test_gateway_queue_depth_scales_up_when_serve_only_sees_the_dispatched_requests():
    # The gateway's fair queue hands Serve at most 8 requests (its slots), so Serve's count
    # stays at one replica's target while 40 requests wait; the queue depth is the demand.
    cfg = ReplicaAutoscalingConfig(enabled=True, target_ongoing_requests=8, max_replicas=4,
                                   upscale_delay_s=0)
    blind = decide(ScalingContext(ScalingSignals(0, 1, 8.0), cfg))[0]
    seen = decide(ScalingContext(ScalingSignals(0, 1, 8.0, gateway_queued_requests=40), cfg))[0]
    assert (blind, seen) == (1, 4)
    # A standing gateway queue also keeps replicas from scaling down.
    state, replicas = {}, 4
    for t in range(0, 200, 10):
        replicas, state = decide(ScalingContext(
            ScalingSignals(t, replicas, 8.0, gateway_queued_requests=24), cfg, state))
    assert replicas == 4


def test_ray_policy_reads_serve_context_and_custom_metrics():
    rid = [ReplicaID(unique_id=f"r{i}", deployment_id=DeploymentID("m", "app")) for i in range(2)]
    cfg = ReplicaAutoscalingConfig(enabled=True, max_replicas=4, ttft_slo_s=1.0)
    ctx = AutoscalingContext(
        deployment_id=DeploymentID("m", "app"), deployment_name="m", app_name="app",
        current_num_replicas=2, target_num_replicas=2, running_replicas=rid,
        total_num_requests=lambda: 6.0, total_queued_requests=0.0,
        aggregated_metrics={"kv_cache_usage_ratio": {rid[0]: 0.2, rid[1]: 0.4},
                            "ttft_s": {rid[0]: 2.0, rid[1]: 3.0},
                            "gateway_queued_requests": {rid[0]: 3.0, rid[1]: 5.0}},
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=1000.0, config=None)
    replicas, debug = LLMAutoscalingPolicy(**cfg.model_dump())(ctx)
    assert replicas == 3
    assert any("ttft 2.5 s" in r for r in debug["reasons"])
    # Load = 6 ongoing + 5 waiting at the gateways (every replica reads the board; the larger
    # reading counts); with a target of 4 per replica that asks for ceil(11 / 4) = 3.
    cfg4 = ReplicaAutoscalingConfig(enabled=True, max_replicas=4, target_ongoing_requests=4)
    replicas, debug = LLMAutoscalingPolicy(**cfg4.model_dump())(ctx)
    assert replicas == 3 and "load 11 > 2 x 4" in debug["reasons"][0]
    blind = cfg4.model_copy(update={"count_gateway_queue": False})
    assert LLMAutoscalingPolicy(**blind.model_dump())(ctx)[0] == 2  # ceil(6 / 4)


def test_deployment_options_install_the_policy_router_and_drain_in_serve():
    model = ModelConfig.model_validate(fake_model(
        routing={"policy": "prefix_affinity"},
        autoscaling={"enabled": True, "min_replicas": 0, "max_replicas": 3,
                     "drain_timeout_s": 45}))
    options = scaling_options(model)
    serve_cfg = AutoscalingConfig(**options["autoscaling_config"])
    assert (serve_cfg.min_replicas, serve_cfg.max_replicas) == (0, 3)
    policy = serve_cfg.policy.get_policy()
    assert policy.__name__ == "LLMAutoscalingPolicy"
    assert policy(**serve_cfg.policy.policy_kwargs).config == model.autoscaling
    assert options["graceful_shutdown_timeout_s"] == 45
    kwargs = options["request_router_config"]["request_router_kwargs"]
    assert kwargs["model"] == model.name and kwargs["routing"]["policy"] == "prefix_affinity"
    fixed = scaling_options(ModelConfig.model_validate(fake_model()))
    assert "autoscaling_config" not in fixed


def test_ttft_window_forgets_old_samples():
    window = TtftWindow(window_s=10)
    window.record(4.0, now_s=0)
    window.record(2.0, now_s=8)
    assert window.mean(now_s=9) == 3.0
    assert window.mean(now_s=15) == 2.0
    assert window.mean(now_s=30) is None
