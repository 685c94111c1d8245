"""The benchmarks' timer (moe_kernels.testing.bench; time_cuda_us is its one-candidate case) on the
GPU: it must order and scale known amounts of GPU work, or every ratio in bench/results is wrong."""

import torch
from conftest import requires_cuda

from moe_kernels.testing import time_cuda_us_interleaved

SHORT, LONG = 200_000, 800_000  # cycles of torch.cuda._sleep: ~0.1 and ~0.4 ms


@requires_cuda
def test_interleaved_timer_orders_and_scales_known_work():
    fns = {"long": lambda: torch.cuda._sleep(LONG), "short": lambda: torch.cuda._sleep(SHORT)}
    us = time_cuda_us_interleaved(fns, warmup=2, reps=9)
    assert set(us) == {"long", "short"}
    assert 3.0 < us["long"] / us["short"] < 5.0, us
