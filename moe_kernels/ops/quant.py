"""FP8 e4m3 quantisation: 1x128 activation groups and 128x128 weight blocks (DESIGN.md §3)."""

import torch

from moe_kernels import reference
from moe_kernels._checks import (
    FLOAT_DTYPES,
    FP8,
    QUANT_BLOCK,
    check,
    check_dim,
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


def quantize_fp8_weight_transposed(
    w: torch.Tensor, *, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_fp8_weight`` and, in the same pass, the transposed e4m3 copy [.., K, N] (N a
    multiple of 128): (q, scales, q_t). The transpose's 128x128 scales are ``scales`` transposed."""
    return torch.ops.moe_kernels.quantize_fp8_weight_transposed(w, pow2_scale)


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


def quantize_fp8_transposed(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    x_scales: torch.Tensor | None = None,
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 weight-gradient GEMM's operand: each expert's rows transposed and quantised with one
    scale per channel and 128 rows (DeepSeek-V3's 128x1 tiles), in one pass.

    Args:
        x: [M, C] bfloat16, or float8_e4m3fn with its 1x128 ``x_scales`` [M, C/128] (activations the
            forward cached in FP8: dequantised and requantised in the same kernel). C a multiple of 128.
        expert_offsets: int32 [E + 1] on x's device: rows of expert e are [offsets[e], offsets[e+1]).
    Returns:
        (q, scales, padded_offsets), flat: expert e's rows padded with zeros to R_pad (a multiple of
        128) form a [C, R_pad] e4m3 block at q[C * padded[e]:], its scales a [R_pad / 128, C] block at
        scales[C * padded[e] / 128:]; padded_offsets int32 [E + 1] from 0. q holds
        (M // 128 + E) * 128 * C values (the most padding can take); the tail is unspecified.
    Bit-exact with ``reference.quantize_fp8_transposed`` (``quantize_fp8``'s rules per group).
    """
    return torch.ops.moe_kernels.quantize_fp8_transposed(x, x_scales, expert_offsets, pow2_scale)


def _check_transposed_args(x, x_scales, expert_offsets):
    op = "quantize_fp8_transposed"
    check_dim(x, 2, op, "x", "[rows, channels]")
    check_dtype(x, (torch.bfloat16, FP8), op, "x")
    check(
        x.shape[1] % QUANT_BLOCK == 0 and x.shape[1] > 0,
        op,
        f"x's channels must be a positive multiple of 128, got {x.shape[1]}",
    )
    fp8 = x.dtype == FP8
    check(
        fp8 == (x_scales is not None),
        op,
        "float8_e4m3fn x needs x_scales (1x128)" if fp8 else "bfloat16 x takes no x_scales",
    )
    check_dtype(expert_offsets, torch.int32, op, "expert_offsets")
    check(
        expert_offsets.dim() == 1 and expert_offsets.shape[0] >= 2,
        op,
        f"expert_offsets must be [experts + 1], got shape {list(expert_offsets.shape)}",
    )


@register_fake("quantize_fp8_transposed")
def _quantize_fp8_transposed_fake(x, x_scales, expert_offsets, pow2_scale):
    _check_transposed_args(x, x_scales, expert_offsets)
    capacity = reference.transposed_capacity(x.shape[0], expert_offsets.shape[0] - 1)
    return (
        x.new_empty((capacity * x.shape[1],), dtype=FP8),
        x.new_empty((capacity // QUANT_BLOCK * x.shape[1],), dtype=torch.float32),
        expert_offsets.new_empty(expert_offsets.shape),
    )


@register_cpu("quantize_fp8_transposed")
def _quantize_fp8_transposed_cpu(x, x_scales, expert_offsets, pow2_scale):
    _check_transposed_args(x, x_scales, expert_offsets)
    return reference.quantize_fp8_transposed(x, expert_offsets, x_scales, pow2_scale)


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


def _check_transposable(w):
    check(
        w.shape[-2] % QUANT_BLOCK == 0,
        "quantize_fp8_weight_transposed",
        f"w's N must be a multiple of 128 for the transposed copy, got {w.shape[-2]}",
    )


@register_cpu("quantize_fp8_weight_transposed")
def _quantize_fp8_weight_transposed_cpu(w, pow2_scale=False):
    check_quantize_fp8_weight_args(w)
    _check_transposable(w)
    q, scales = reference.quantize_fp8_weight(w, pow2_scale)
    return q, scales, q.view(torch.uint8).transpose(-1, -2).contiguous().view(FP8)


@register_fake("quantize_fp8_weight_transposed")
def _quantize_fp8_weight_transposed_fake(w, pow2_scale=False):
    _check_transposable(w)
    q, scales = _quantize_fp8_weight_fake(w, pow2_scale)
    return q, scales, q.transpose(-1, -2).contiguous()


@register_fake("dequantize_fp8")
def _dequantize_fp8_fake(q, scales, out_dtype):
    check_dtype(q, FP8, "dequantize_fp8", "q")
    check_dtype(torch.empty(0, dtype=out_dtype), FLOAT_DTYPES, "dequantize_fp8", "out_dtype")
    return q.new_empty(q.shape, dtype=out_dtype)
