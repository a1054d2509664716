from pathlib import Path

import pytest

from moestack.config import embedded_default_path, load_config, parse_config
from moestack.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_is_the_tiny_deepseek_on_cpu():
    config = load_config()
    (model,) = config.models
    assert model.tiny is not None and model.tiny.arch == "deepseek-v3"
    assert model.engine == "vllm" and model.accelerator == "cpu"
    assert (config.gateway.host, config.gateway.port) == ("127.0.0.1", 8000)
    assert config.storage.url.startswith("sqlite:///")


def test_deploy_local_yaml_is_the_embedded_default():
    assert (REPO / "deploy" / "local.yaml").resolve() == embedded_default_path().resolve()


def test_deepseek_v4_local_config_is_the_default_with_the_tiny_v4_model():
    v3, v4 = load_config(), load_config(REPO / "deploy" / "local-deepseek-v4.yaml")
    (model,) = v4.models
    assert model.tiny is not None and model.tiny.arch == "deepseek-v4"
    assert model.architecture == "DeepseekV4ForCausalLM" and model.name == "tiny-deepseek-v4"
    same = {"name": model.name, "tiny": model.tiny, "architecture": model.architecture}
    assert v3.models[0].model_copy(update=same) == model
    assert v3.model_copy(update={"models": v4.models}) == v4


def test_tests_of_the_default_model_run_on_the_embedded_default_unless_told(monkeypatch):
    from moestack.testing.configs import default_tiny_arch, tiny_model

    monkeypatch.delenv("MOESTACK_TEST_TINY_ARCH", raising=False)
    (model,) = load_config().models
    assert default_tiny_arch() == model.tiny.arch
    entry = tiny_model(default_tiny_arch())
    assert (entry["name"], entry["architecture"]) == (model.name, model.architecture)
    monkeypatch.setenv("MOESTACK_TEST_TINY_ARCH", "deepseek-v4")
    (v4,) = load_config(REPO / "deploy" / "local-deepseek-v4.yaml").models
    entry = tiny_model(default_tiny_arch())
    assert (entry["name"], entry["architecture"]) == (v4.name, v4.architecture)


def test_error_names_every_bad_field_and_why(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    tiny: {arch: gpt2}\n"
                   "    parallelism: {tensor_parallel_size: 0, tp: 2}\ngateway: {port: 70000}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert "models[0].tiny.arch" in msg and "'gpt2'" in msg
    assert "models[0].parallelism.tensor_parallel_size" in msg
    assert "models[0].parallelism.tp: unknown field" in msg
    assert "gateway.port" in msg


def test_rejects_model_with_both_or_neither_source():
    with pytest.raises(ConfigError, match="exactly one of `path`"):
        parse_config({"models": [{"name": "m"}]})
    with pytest.raises(ConfigError, match="exactly one of `path`"):
        parse_config({"models": [{"name": "m", "path": "/x", "tiny": {"arch": "mixtral"}}]})


def test_rejects_an_unknown_engine_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"models\[0\]\.engine: .*unknown engine 'nope'; "
                                          r"installed engines: fake, vllm"):
        parse_config({"models": [{"name": "m", "engine": "nope"}]})


def test_engine_names_come_from_the_entry_point_group_and_build_that_class():
    from moestack.config.schema import ModelConfig, engine_names
    from moestack.engine import build_engine
    from moestack.testing import FakeEngine

    assert engine_names() == ("fake", "vllm")
    model = ModelConfig.model_validate({"name": "m", "engine": "fake"})
    assert type(build_engine(model)) is FakeEngine


def test_rejects_duplicate_model_names():
    with pytest.raises(ConfigError, match="repeated: m"):
        parse_config({"models": [{"name": "m", "engine": "fake"}] * 2})


def test_rejects_empty_model_list_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="models"):
        parse_config({"models": []})
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)


def test_reports_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    f = tmp_path / "sub" / "c.yaml"
    f.parent.mkdir()
    f.write_text("models:\n  - {name: m, path: ckpt}\nstorage: {url: 'sqlite:///data/m.db'}\n"
                 "pricing_file: pricing.yaml\n")
    config = load_config(f)
    assert config.models[0].path == f.parent / "ckpt"
    assert config.pricing_file == f.parent / "pricing.yaml"
    assert config.storage.url == f"sqlite:///{f.parent / 'data' / 'm.db'}"


def test_world_size_multiplies_parallel_degrees():
    config = parse_config({"models": [{"name": "m", "engine": "fake", "parallelism": {
        "tensor_parallel_size": 4, "pipeline_parallel_size": 2, "data_parallel_size": 2}}]})
    assert config.models[0].parallelism.world_size == 16


def test_rejects_a_stream_batch_ceiling_below_its_floor():
    serving = {"stream_batch_interval_ms": 50, "stream_batch_max_interval_ms": 20}
    with pytest.raises(ConfigError, match="stream_batch_max_interval_ms must be at least"):
        parse_config({"models": [{"name": "m", "engine": "fake", "serving": serving}]})
