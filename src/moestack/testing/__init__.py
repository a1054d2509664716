"""Test helpers shipped with the package: the fake engine (engine `fake`), config builders, and
the gateway app served in-process (:mod:`.local_api`) or over HTTP (:mod:`.gateway_server`)."""

from moestack.testing.configs import fake_config, fake_model
from moestack.testing.fake_engine import FakeEngine, FakeFault

__all__ = ["FakeEngine", "FakeFault", "fake_config", "fake_model"]
