"""Config builders for tests: a valid tree with fake-engine models and small limits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moestack.config import MoestackConfig, load_config, parse_config

TINY_ARCHITECTURES = {"deepseek-v3": "DeepseekV3ForCausalLM",
                      "deepseek-v4": "DeepseekV4ForCausalLM",
                      "mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM"}
"""Each tiny architecture's ``architectures[0]`` (:mod:`moestack.engine.tiny`)."""


def default_tiny_arch() -> str:
    """The tiny architecture the tests of the embedded default's model run on: the one
    ``MOESTACK_TEST_TINY_ARCH`` names, else the embedded default's (``deploy/local.yaml``)."""
    return os.environ.get("MOESTACK_TEST_TINY_ARCH") or load_config().models[0].tiny.arch


def tiny_model(arch: str, **overrides: Any) -> dict[str, Any]:
    """A raw vLLM model entry serving the tiny ``arch`` checkpoint as ``tiny-<arch>``."""
    return {"name": f"tiny-{arch}", "tiny": {"arch": arch, "seed": 0},
            "architecture": TINY_ARCHITECTURES[arch], **overrides}


def fake_model(name: str = "fake-moe", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "engine": "fake", "max_model_len": 256, **overrides}


def fake_config(*models: dict[str, Any], **sections: Any) -> MoestackConfig:
    """A :class:`MoestackConfig` serving ``models`` (default: one fake model)."""
    raw: dict[str, Any] = {"models": list(models) or [fake_model()],
                           "storage": {"url": "sqlite:///:memory:"},
                           "tenancy": {"enabled": False}}
    raw.update(sections)
    return parse_config(raw)


def fake_stack_config(tmp_dir: Path, *models: dict[str, Any], port: int, ingress: str = "direct",
                      gateway_replicas: int = 1, lease_s: float = 60.0,
                      admin_key_env: str = "MOESTACK_ADMIN_KEY") -> dict[str, Any]:
    """A raw config for :func:`moestack.testing.stack_process.start_stack`: ``moestack up`` on
    fake-engine ``models`` (default: one), the public API on ``port``, tenancy on with no
    bootstrap tenant (make tenants through the admin API, key in ``admin_key_env``), the ledger
    in a SQLite file in ``tmp_dir``, a 2-CPU Ray."""
    return {"models": list(models) or [fake_model()],
            "gateway": {"host": "127.0.0.1", "port": port, "ingress": ingress,
                        "num_replicas": gateway_replicas},
            "storage": {"url": f"sqlite:///{Path(tmp_dir) / 'moestack.db'}"},
            "tenancy": {"enabled": True, "bootstrap_tenant": None, "lease_s": lease_s,
                        "admin_key_env": admin_key_env},
            "ray": {"num_cpus": 2}}
