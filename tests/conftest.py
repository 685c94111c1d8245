"""Markers that skip cleanly where the hardware is missing: requires_cuda, requires_sm90, requires_gpus(n)."""

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
