"""Layout planner: model shapes, GPU catalog, TP/PP/DP/EP layout rules, memory, roofline, cost,
and the Ray placement bundles of a replica.

A layout is the config's :class:`~moestack.config.schema.Layout` (a model's ``parallelism``);
prices come from the caller (the planner reads no pricing catalog).
"""

from moestack.parallel.gpus import GPUS, GPUSpec, get_gpu
from moestack.parallel.layout import executor_backend, layout_problems
from moestack.parallel.planner import Plan, PlanRequest, plan
from moestack.parallel.shapes import SHAPES, ModelShape, get_shape, shape_from_hf_config

__all__ = [
    "GPUS", "GPUSpec", "ModelShape", "Plan", "PlanRequest", "SHAPES", "executor_backend",
    "get_gpu", "get_shape", "layout_problems", "plan", "shape_from_hf_config",
]
