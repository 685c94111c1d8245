"""FP8 e4m3 quantisation: 1x128 activation groups and 128x128 weight blocks (DESIGN.md §3)."""

import torch

from moe_kernels import reference
from moe_kernels._checks import (
    FLOAT_DTYPES,
    FP8,
    QUANT_BLOCK,
    check_dtype,
    check_quantize_fp8_args,
    check_quantize_fp8_weight_args,
)
from moe_kernels.ops._library import register_cpu, register_fake


def quantize_fp8(x: torch.Tensor, *, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations to FP8 with one fp32 scale per row per 128 channels ("1x128").

    Args:
        x: [M, K] bfloat16, float16 or float32; K a multiple of 128. M may be 0.
        pow2_scale: round every scale up to a power of two (dequantisation is then exact scaling).
    Returns:
        q: [M, K] float8_e4m3fn.
        scales: [M, K // 128] float32, what to multiply by to dequantise.
    Per group: scale = amax / 448 over the group's finite values (1 if the group is all zero, at
    least FLT_MIN); q = x * (1 / scale) rounded to nearest even. NaN stays NaN; +-inf and finite overflow
    saturate to +-448. Bit-exact with ``moe_kernels.reference.quantize_fp8``.
    """
    return torch.ops.moe_kernels.quantize_fp8(x, pow2_scale)


def quantize_fp8_weight(w: torch.Tensor, *, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise weights to FP8 with one fp32 scale per 128x128 block (DeepSeek-V3 checkpoint layout).

    Args:
        w: [N, K] or [E, N, K] bfloat16, float16 or float32; K a multiple of 128 (N need not be).
        pow2_scale: round every scale up to a power of two.
    Returns:
        q: float8_e4m3fn, w's shape.
        scales: float32 [ceil(N/128), K/128] or [E, ceil(N/128), K/128] (``weight_scale_inv``).
    Same rules as ``quantize_fp8`` per block. Bit-exact with ``moe_kernels.reference.quantize_fp8_weight``.
    """
    return torch.ops.moe_kernels.quantize_fp8_weight(w, pow2_scale)


def dequantize_fp8(
    q: torch.Tensor, scales: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Multiply FP8 values by their block scales: q.float() * scale, rounded to out_dtype.

    Args:
        q: float8_e4m3fn [M, K] or [E, N, K].
        scales: float32, 1x128 ([M, K/128]) or 128x128 ([.., ceil(N/128), K/128]), told apart by shape.
        out_dtype: bfloat16, float16 or float32.
    """
    return torch.ops.moe_kernels.dequantize_fp8(q, scales, out_dtype)


register_cpu("quantize_fp8")(reference.quantize_fp8)
register_cpu("quantize_fp8_weight")(reference.quantize_fp8_weight)
register_cpu("dequantize_fp8")(reference.dequantize_fp8)


@register_fake("quantize_fp8")
def _quantize_fp8_fake(x, pow2_scale=False):
    check_quantize_fp8_args(x)
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(
        (x.shape[0], x.shape[1] // QUANT_BLOCK), dtype=torch.float32
    )


@register_fake("quantize_fp8_weight")
def _quantize_fp8_weight_fake(w, pow2_scale=False):
    check_quantize_fp8_weight_args(w)
    n, k = w.shape[-2], w.shape[-1]
    scales_shape = (*w.shape[:-2], (n + QUANT_BLOCK - 1) // QUANT_BLOCK, k // QUANT_BLOCK)
    return w.new_empty(w.shape, dtype=FP8), w.new_empty(scales_shape, dtype=torch.float32)


@register_fake("dequantize_fp8")
def _dequantize_fp8_fake(q, scales, out_dtype):
    check_dtype(q, FP8, "dequantize_fp8", "q")
    check_dtype(torch.empty(0, dtype=out_dtype), FLOAT_DTYPES, "dequantize_fp8", "out_dtype")
    return q.new_empty(q.shape, dtype=out_dtype)
