"""Typed front doors of the moe_kernels ops, with their fake (meta) kernels and CPU implementations."""

from moe_kernels.ops.build_info import nccl_version
from moe_kernels.ops.device_error import check_device_errors
from moe_kernels.ops.grouped_gemm import GEMM_CONFIGS, grouped_gemm, silu_mul
from moe_kernels.ops.permute import PermuteResult, permute, unpermute
from moe_kernels.ops.quant import dequantize_fp8, quantize_fp8, quantize_fp8_weight
from moe_kernels.ops.router import (
    RouterOutput,
    balance_loss,
    device_balance_loss,
    expert_balance_loss,
    router,
    router_preset,
    update_expert_bias_,
)

__all__ = [
    "GEMM_CONFIGS",
    "PermuteResult",
    "RouterOutput",
    "balance_loss",
    "check_device_errors",
    "dequantize_fp8",
    "device_balance_loss",
    "expert_balance_loss",
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
