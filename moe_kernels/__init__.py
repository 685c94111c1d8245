"""moe_kernels: fast Mixture-of-Experts kernels for NVIDIA Hopper, registered as PyTorch ops.

Ops live under ``torch.ops.moe_kernels``; the typed front doors are re-exported here.
Every op also has a CPU implementation (the pure-PyTorch reference of ``moe_kernels.reference``).
"""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from moe_kernels import _C  # noqa: F401, E402  (registers the op schemas and CUDA kernels)
from moe_kernels.ops import (  # noqa: E402
    GEMM_CONFIGS,
    PermuteResult,
    RouterOutput,
    all_reduce_counts,
    balance_loss,
    check_device_errors,
    dequantize_fp8,
    device_balance_loss,
    expert_balance_loss,
    expert_mlp,
    grouped_gemm,
    nccl_version,
    permute,
    quantize_fp8,
    quantize_fp8_weight,
    router,
    router_preset,
    silu_mul,
    unpermute,
    update_expert_bias_,
)
from moe_kernels.presets import PRESETS, RouterPreset  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GEMM_CONFIGS",
    "PRESETS",
    "PermuteResult",
    "RouterOutput",
    "RouterPreset",
    "all_reduce_counts",
    "balance_loss",
    "check_device_errors",
    "dequantize_fp8",
    "device_balance_loss",
    "expert_balance_loss",
    "expert_mlp",
    "grouped_gemm",
    "nccl_version",
    "permute",
    "quantize_fp8",
    "quantize_fp8_weight",
    "router",
    "router_preset",
    "silu_mul",
    "unpermute",
    "update_expert_bias_",
]
