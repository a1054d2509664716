"""Test helpers shipped with the package: the fake engine and config builders."""

from moestack.testing.configs import fake_config, fake_model
from moestack.testing.fake_engine import FakeEngine, FakeFault

__all__ = ["FakeEngine", "FakeFault", "fake_config", "fake_model"]
