"""``moestack plan`` on the command line and the GPU deployment configs in deploy/."""

import json
from pathlib import Path

import pytest

from moestack.cli import main
from moestack.cli.plan import parse_tokens, plan_configured
from moestack.config import load_config
from moestack.errors import ConfigError
from moestack.metering.pricing import load_pricing
from moestack.parallel.from_config import plan_model
from moestack.serve.placement import model_server_options

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GPU_LAYOUTS = {
    "deepseek-v3-2x8xh100.yaml": (16, 2, True),   # GPUs, nodes, expert parallel
    "mixtral-8x7b-2xh100.yaml": (2, 1, True),
    "qwen3-30b-a3b-1xh100.yaml": (1, 1, False),
    "deepseek-v4-flash-1x8xh100.yaml": (8, 1, True),
    "deepseek-v4-pro-1x8xh200.yaml": (8, 1, False),
}


@pytest.mark.parametrize("name", sorted(GPU_LAYOUTS))
def test_deploy_gpu_layout_passes_plan(name):
    config = load_config(DEPLOY / name)
    (model,) = config.models
    p = plan_configured(model, config)
    gpus, nodes, ep = GPU_LAYOUTS[name]
    assert p.fits, p.problems
    assert (p.layout.world_size, p.nodes, p.layout.expert_parallel) == (gpus, nodes, ep)
    assert p.usd_per_gpu_hour == load_pricing().usd_per_gpu_hour(p.gpu.accelerator_type)
    # The ModelServer reserves exactly what the plan says.
    bundles, strategy = p.placement()
    opts = model_server_options(model)
    assert opts["placement_group_bundles"] == bundles
    assert opts["placement_group_strategy"] == strategy
    for key, value in p.engine_args().items():
        if key in model.engine_args:
            assert model.engine_args[key] == value, key


def test_plan_of_config_prices_gpus_with_the_config_override(tmp_path):
    cfg = tmp_path / "priced.yaml"
    cfg.write_text((DEPLOY / "qwen3-30b-a3b-1xh100.yaml").read_text()
                   + "cost: {usd_per_gpu_hour: {H100: 1.25}}\n")
    config = load_config(cfg)
    p = plan_configured(config.models[0], config)
    assert p.usd_per_gpu_hour == 1.25 and p.usd_per_hour == 1.25


def test_plan_of_config_flags_a_non_ray_backend_for_multi_gpu_replica(tmp_path):
    text = (DEPLOY / "mixtral-8x7b-2xh100.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("distributed_executor_backend: ray",
                                "distributed_executor_backend: mp"))
    p = plan_model(load_config(bad).models[0])
    assert not p.fits and any("must be `ray` (or unset), not `mp`" in m for m in p.problems)


def test_plan_of_config_accepts_the_default_backend_for_multi_gpu_replica(tmp_path):
    text = (DEPLOY / "mixtral-8x7b-2xh100.yaml").read_text()
    ok = tmp_path / "ok.yaml"
    ok.write_text(text.replace("distributed_executor_backend: ray", "enforce_eager: true"))
    assert plan_model(load_config(ok).models[0]).fits


def test_plan_command_prints_fit_and_exits_zero(capsys):
    assert main(["plan", "--model", "deepseek-v3", "--gpu", "h100", "--nodes", "2",
                 "--context", "32k", "--usd-per-gpu-hour", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "16 x h100 (2 node(s) of 8)" in out
    assert "USD per 1M output tokens" in out and "2.5 per GPU-hour" in out


def test_plan_command_explains_why_and_exits_one(capsys):
    assert main(["plan", "--model", "deepseek-v3", "--gpu", "h100", "--nodes", "1",
                 "--context", "32k"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "GiB per GPU" in out


def test_plan_command_json_carries_engine_args_and_placement(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "h100", "--gpus", "2",
                 "--tp", "2", "--context", "8k", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["layout"]["tensor_parallel_size"] == 2
    assert data["vllm_engine_args"]["tensor_parallel_size"] == 2
    assert data["ray_placement"]["strategy"] == "STRICT_PACK"
    assert data["context_tokens"] == 8192
    assert data["usd_per_gpu_hour"] == load_pricing().usd_per_gpu_hour("H100")


def test_plan_command_checks_a_deploy_config(capsys):
    assert main(["plan", "--config", str(DEPLOY / "deepseek-v3-2x8xh100.yaml")]) == 0
    assert "TP=8 PP=1 DP=2 EP=16" in capsys.readouterr().out


def test_plan_command_reads_a_checkpoint_folder(tmp_path, capsys):
    from moestack.engine.tiny import TinySpec, build_tiny_model

    out = build_tiny_model(TinySpec("mixtral"), tmp_path / "ckpt")
    assert main(["plan", "--model", str(out), "--gpu", "l40s", "--gpus", "2", "--context",
                 "4k", "--usd-per-gpu-hour", "1"]) == 0
    assert "FITS" in capsys.readouterr().out


@pytest.mark.parametrize("text,tokens", [("32k", 32768), ("128K", 131072), ("4096", 4096),
                                         ("1m", 1048576)])
def test_context_accepts_k_and_m_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


def test_context_rejects_garbage():
    with pytest.raises(ConfigError, match="token count"):
        parse_tokens("lots")


@pytest.mark.parametrize("model", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_plan_of_a_v4_model_shows_the_deepseek_api_price_beside_its_own(model, capsys):
    assert main(["plan", "--model", model, "--gpu", "b200", "--context", "128k"]) == 0
    out = capsys.readouterr().out
    api = load_pricing().baselines[model]
    assert (f"baseline {model} (DeepSeek API, {api.as_of.isoformat()}): "
            f"{api.usd_per_1m_input_tokens:g} input / {api.usd_per_1m_cached_input_tokens:g} "
            f"cached input / {api.usd_per_1m_output_tokens:g} output USD per 1M tokens") in out
    assert "at 128K context:" in out and "at 1M context:" in out


def test_plan_json_of_a_v4_model_carries_both_contexts_and_the_baseline(capsys):
    assert main(["plan", "--model", "deepseek-v4-flash", "--gpu", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["context_tokens"] for c in out["at_context"]] == [131072, 1048576]
    assert out["baseline"]["name"] == "deepseek-v4-flash"
    assert out["vllm_engine_args"]["kv_cache_dtype"] == "fp8_ds_mla"
    assert out["kv_cache"]["fixed_bytes_per_sequence_per_gpu"] > 0


def test_plan_of_v4_pro_on_one_h100_node_says_it_does_not_fit_and_exits_one(capsys):
    assert main(["plan", "--model", "deepseek-v4-pro", "--gpu", "h100", "--context", "128k"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "GiB per GPU" in out


@pytest.mark.parametrize("name,baseline", [("deepseek-v4-flash-1x8xh100.yaml", "deepseek-v4-flash"),
                                           ("deepseek-v4-pro-1x8xh200.yaml", "deepseek-v4-pro")])
def test_v4_deploy_configs_are_planned_beside_their_api_price(name, baseline):
    config = load_config(DEPLOY / name)
    (model,) = config.models
    p = plan_configured(model, config)
    assert p.baseline is not None and p.baseline.name == baseline
    assert p.usd_per_1m_output_tokens < p.baseline.usd_per_1m_output_tokens
    assert {c.context_tokens for c in p.at_contexts} == {131072, 1048576}
