"""The configuration tree (pydantic) and its YAML loader."""

from moestack.config.loader import embedded_default_path, load_config, parse_config
from moestack.config.schema import (
    FakeEngineSettings,
    GatewayConfig,
    Layout,
    ModelConfig,
    MoestackConfig,
    MonitoringConfig,
    RayConfig,
    StorageConfig,
    TinyModelSource,
)

__all__ = [
    "FakeEngineSettings", "GatewayConfig", "Layout", "ModelConfig", "MoestackConfig",
    "MonitoringConfig", "RayConfig", "StorageConfig", "TinyModelSource", "embedded_default_path",
    "load_config", "parse_config",
]
