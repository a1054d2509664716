import os

from moestack.config.schema import ModelConfig
from moestack.engine.vllm_engine import engine_env, scoped_env

VAR = "VLLM_ENABLE_V1_MULTIPROCESSING"


def model(**overrides) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "path": "/ckpt", **overrides})


def test_one_cpu_worker_runs_inside_the_engine_core_process(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    assert engine_env(model()) == {VAR: "0"}


def test_several_cpu_workers_and_gpu_engines_keep_vllms_own_process_layout(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    assert engine_env(model(parallelism={"tensor_parallel_size": 2})) == {}
    assert engine_env(model(accelerator="gpu")) == {}


def test_a_value_the_replica_environment_sets_wins(monkeypatch):
    monkeypatch.setenv(VAR, "1")
    assert engine_env(model()) == {}


def test_engine_environment_is_set_only_while_the_engine_starts(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setenv("MOESTACK_TEST_KEPT", "before")
    with scoped_env({VAR: "0", "MOESTACK_TEST_KEPT": "during"}):
        assert (os.environ[VAR], os.environ["MOESTACK_TEST_KEPT"]) == ("0", "during")
    assert VAR not in os.environ and os.environ["MOESTACK_TEST_KEPT"] == "before"
