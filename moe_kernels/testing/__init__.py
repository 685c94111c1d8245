"""Helpers shared by tests/ and bench/: tolerances and metrics (numeric), timing and JSON results
(bench), router selection checks (router), the multi-process launcher (distributed), expert-parallel
inputs and checks (ep), tiny offline transformers models (transformers_models). The last three are
imported on demand (transformers_models needs transformers)."""

from moe_kernels.testing.bench import (
    capture_cuda_graph,
    environment,
    geomean,
    git_commit,
    gpu_time_us,
    host_time_us,
    measure_copy_tbps,
    print_table,
    report,
    time_cuda_graph_us,
    time_cuda_us,
    time_cuda_us_interleaved,
    write_json,
)
from moe_kernels.testing.numeric import (
    BF16_ERROR_FACTOR,
    FP8_GEMM_CALC_DIFF,
    ROUTER_WEIGHT_ATOL,
    ROUTER_WEIGHT_RTOL,
    assert_bitwise_equal,
    calc_diff,
    poison_allocator_,
    rel_error,
)
from moe_kernels.testing.router import ROUTER_SEL_TOL, assert_router_matches_reference

__all__ = [
    "BF16_ERROR_FACTOR",
    "FP8_GEMM_CALC_DIFF",
    "ROUTER_SEL_TOL",
    "ROUTER_WEIGHT_ATOL",
    "ROUTER_WEIGHT_RTOL",
    "assert_bitwise_equal",
    "assert_router_matches_reference",
    "calc_diff",
    "capture_cuda_graph",
    "environment",
    "geomean",
    "git_commit",
    "gpu_time_us",
    "host_time_us",
    "measure_copy_tbps",
    "poison_allocator_",
    "print_table",
    "rel_error",
    "report",
    "time_cuda_graph_us",
    "time_cuda_us",
    "time_cuda_us_interleaved",
    "write_json",
]
