"""LoRA adapters: checking an adapter directory against its base model, and building random ones.

Engine-independent: registration checks an adapter here (:func:`inspect_adapter`) before any
replica loads it; the engines load adapters through their own LoRA support.
"""

from moestack.adapters.build import AdapterSpec, build_adapter
from moestack.adapters.inspection import ADAPTER_FILES, AdapterInfo, inspect_adapter
from moestack.adapters.shapes import BaseShape, Projection, base_shape

__all__ = ["ADAPTER_FILES", "AdapterInfo", "AdapterSpec", "BaseShape", "Projection",
           "base_shape", "build_adapter", "inspect_adapter"]
