"""Layout planner: model shapes, GPU catalog, TP/PP/DP/EP layouts, memory, roofline, cost."""

from moestack.parallel.gpus import GPUS, GPUSpec, get_gpu
from moestack.parallel.layout import Layout, layout_problems
from moestack.parallel.planner import Plan, PlanRequest, plan
from moestack.parallel.shapes import SHAPES, ModelShape, get_shape, shape_from_hf_config

__all__ = [
    "GPUS", "GPUSpec", "Layout", "ModelShape", "Plan", "PlanRequest", "SHAPES", "get_gpu",
    "get_shape", "layout_problems", "plan", "shape_from_hf_config",
]
