"""Config builders for tests: a valid tree with fake-engine models and small limits."""

from __future__ import annotations

from typing import Any

from moestack.config import MoestackConfig, parse_config


def fake_model(name: str = "fake-moe", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "engine": "fake", "max_model_len": 256, **overrides}


def fake_config(*models: dict[str, Any], **sections: Any) -> MoestackConfig:
    """A :class:`MoestackConfig` serving ``models`` (default: one fake model)."""
    raw: dict[str, Any] = {"models": list(models) or [fake_model()],
                           "storage": {"url": "sqlite:///:memory:"},
                           "tenancy": {"enabled": False}}
    raw.update(sections)
    return parse_config(raw)
