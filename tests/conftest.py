"""Markers that skip cleanly where the hardware is missing: requires_cuda, requires_sm90, requires_gpus(n)."""

import os

import pytest
import torch


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _is_sm90() -> bool:
    return _cuda_count() > 0 and torch.cuda.get_device_capability(0) == (9, 0)


requires_cuda = pytest.mark.skipif(_cuda_count() == 0, reason="needs a CUDA GPU")
requires_sm90 = pytest.mark.skipif(not _is_sm90(), reason="needs a Hopper GPU (sm_90a kernels)")


def requires_gpus(n: int):
    return pytest.mark.skipif(_cuda_count() < n, reason=f"needs {n} CUDA GPUs, found {_cuda_count()}")


@pytest.fixture
def gen():
    """A seeded generator per test: fresh random data, reproducible failures."""
    return torch.Generator().manual_seed(1234)


# ------------------------------------------------------------------------------------------------
# Hypothesis profiles (tests/test_properties.py): "ci" is small and derandomised, so the CPU suite
# stays fast and reproducible; "gpu" explores more examples where the kernels run. HYPOTHESIS_PROFILE
# overrides the choice.
# ------------------------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    settings = None

HYPOTHESIS_EXAMPLES = {"ci": 12, "gpu": 150}

if settings is not None:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    _common = {"deadline": None, "print_blob": True, "suppress_health_check": _slow_ok}
    settings.register_profile("ci", max_examples=HYPOTHESIS_EXAMPLES["ci"], derandomize=True, **_common)
    settings.register_profile("gpu", max_examples=HYPOTHESIS_EXAMPLES["gpu"], **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if _is_sm90() else "ci"))


# ------------------------------------------------------------------------------------------------
# Soak tests run only when asked for (-m soak): they take minutes on the GPU.
# ------------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: select it with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def flatten(result):
    """The tensors of an op's result (a tensor, None, or nested tuples / lists of them), in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if result is None:
        return []
    return [t for item in result for t in flatten(item)]
