"""Typed front doors of the moe_kernels ops, with their fake (meta) kernels and CPU implementations."""

from moe_kernels.ops.build_info import nccl_version
from moe_kernels.ops.device_error import check_device_errors
from moe_kernels.ops.permute import PermuteResult, permute, unpermute
from moe_kernels.ops.quant import dequantize_fp8, quantize_fp8, quantize_fp8_weight

__all__ = [
    "PermuteResult",
    "check_device_errors",
    "dequantize_fp8",
    "nccl_version",
    "permute",
    "quantize_fp8",
    "quantize_fp8_weight",
    "unpermute",
]
