"""Grouped GEMMs over permuted rows and the expert MLP built from them (DESIGN.md §3).

Rows of expert e are [expert_offsets[e], expert_offsets[e+1]) of ``a``; offsets live on the device
and are never read on the host, so every op here is CUDA-graph capturable.
"""

import torch

from moe_kernels import reference
from moe_kernels._checks import FP8, QUANT_BLOCK, check, check_dim, check_dtype
from moe_kernels.ops._library import register_cpu, register_fake
from moe_kernels.ops.device_error import raise_pending_device_error

GEMM_CONFIGS = (
    "auto",
    "fp8_cooperative_128x128",
    "fp8_pingpong_64x128",
    "bf16_cooperative_128x128",
    "bf16_cooperative_128x256",
    "bf16_pingpong_64x128",
)


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    a_scales: torch.Tensor | None = None,
    b_scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: str = "auto",
) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ b[e]^T for every expert e, in one CUTLASS kernel.

    Args:
        a: [M, K] float8_e4m3fn or bfloat16, contiguous; K a multiple of 128.
        b: [E, N, K] same dtype, contiguous (transformers 5.x expert layout); N a multiple of 128.
        expert_offsets: int32 [E + 1] on a's device: rows of expert e are [offsets[e], offsets[e+1]).
            Any offsets work (empty experts, padding rows, a tail of unused rows after offsets[E]).
        a_scales: FP8 only, fp32 [M, K/128] (1x128 blocks, ``quantize_fp8``).
        b_scales: FP8 only, fp32 [E, N/128, K/128] (128x128 blocks, DeepSeek-V3's weight_scale_inv).
        out: optional bf16 [M, N] to write into.
        config: "auto" (rows per expert M/E decides, see csrc/gemm/grouped_gemm.cu) or a tile
            configuration name from GEMM_CONFIGS.
    Returns:
        bf16 [M, N]. Rows outside [offsets[0], offsets[E]) are left untouched: uninitialised when the
        op allocates ``out``. FP8 accumulates in fp32 with the block scales applied every 128 of K.

    Offsets that are not non-decreasing within [0, M] are clamped into that range on the device (no
    memory outside the tensors is touched) and reported like permute's device-detected errors: the
    next permute / unpermute / grouped_gemm call raises RuntimeError("grouped_gemm: expert_offsets
    were not non-decreasing ..."), ``moe_kernels.check_device_errors()`` at once. (The CPU
    implementation raises ValueError immediately.)
    """
    raise_pending_device_error()
    if out is None:
        return torch.ops.moe_kernels.grouped_gemm(a, b, expert_offsets, a_scales, b_scales, config)
    torch.ops.moe_kernels.grouped_gemm_out(a, b, expert_offsets, a_scales, b_scales, out, config)
    return out


def silu_mul(
    h: torch.Tensor,
    expert_offsets: torch.Tensor | None = None,
    *,
    quantize: bool = False,
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SwiGLU of a gate_up output: SiLU(h[:, :I]) * h[:, I:] in fp32, then bf16 [M, I], or with
    quantize=True e4m3 [M, I] and 1x128 fp32 scales [M, I/128] (``quantize_fp8``'s rules). With
    expert_offsets only rows in [offsets[0], offsets[E]) are computed (the others are unspecified)."""
    act, scales = torch.ops.moe_kernels.silu_mul(h, expert_offsets, quantize, pow2_scale)
    return act, scales if quantize else None


# ------------------------------------------------------------------------------------------------
# CPU path and fake kernels
# ------------------------------------------------------------------------------------------------


def _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config):
    op = "grouped_gemm"
    check_dim(a, 2, op, "a", "[rows, K]")
    check_dim(b, 3, op, "b", "[experts, N, K]")
    check_dtype(a, (FP8, torch.bfloat16), op, "a")
    check(b.dtype == a.dtype, op, f"b must have a's dtype {a.dtype}, got {b.dtype}")
    k, n = a.shape[1], b.shape[1]
    check(b.shape[2] == k, op, f"b must be [experts, N, K={k}], got shape {list(b.shape)}")
    check(k % QUANT_BLOCK == 0 and k > 0, op, f"K (a.shape[1]) must be a positive multiple of 128, got {k}")
    check(n % QUANT_BLOCK == 0 and n > 0, op, f"N (b.shape[1]) must be a positive multiple of 128, got {n}")
    check_dtype(expert_offsets, torch.int32, op, "expert_offsets")
    check(
        tuple(expert_offsets.shape) == (b.shape[0] + 1,),
        op,
        f"expert_offsets must be [experts + 1 = {b.shape[0] + 1}], got shape {list(expert_offsets.shape)}",
    )
    fp8 = a.dtype == FP8
    check(
        fp8 == (a_scales is not None) and fp8 == (b_scales is not None),
        op,
        "FP8 operands need a_scales and b_scales" if fp8 else "bfloat16 operands take no scales",
    )
    check(config in GEMM_CONFIGS, op, f"config must be one of {GEMM_CONFIGS}, got {config!r}")


@register_fake("grouped_gemm")
def _grouped_gemm_fake(a, b, expert_offsets, a_scales, b_scales, config="auto"):
    _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


@register_fake("grouped_gemm_out")
def _grouped_gemm_out_fake(a, b, expert_offsets, a_scales, b_scales, out, config="auto"):
    _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config)


def _check_offset_values(a, expert_offsets):
    """What the CUDA kernel can only clamp and report: offsets non-decreasing within [0, M]."""
    rows, offsets = a.shape[0], expert_offsets.tolist()
    lows = [0, *offsets[:-1]]  # each entry's lower bound: 0, then the entry before it
    for i, (low, offset) in enumerate(zip(lows, offsets, strict=True)):
        check(
            low <= offset <= rows,
            "grouped_gemm",
            f"expert_offsets must be non-decreasing within [0, rows of a = {rows}], got "
            f"expert_offsets[{i}] = {offset}" + (f" after {low}" if i > 0 else ""),
        )


@register_cpu("grouped_gemm")
def _grouped_gemm_cpu(a, b, expert_offsets, a_scales, b_scales, config="auto"):
    _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config)
    _check_offset_values(a, expert_offsets)
    return reference.grouped_gemm(a, b, expert_offsets, a_scales=a_scales, b_scales=b_scales)


@register_cpu("grouped_gemm_out")
def _grouped_gemm_out_cpu(a, b, expert_offsets, a_scales, b_scales, out, config="auto"):
    _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config)
    _check_offset_values(a, expert_offsets)
    result = reference.grouped_gemm(a, b, expert_offsets, a_scales=a_scales, b_scales=b_scales)
    lo, hi = int(expert_offsets[0]), int(expert_offsets[-1])
    out[lo:hi] = result[lo:hi]


def _check_silu_args(h, expert_offsets):
    check_dim(h, 2, "silu_mul", "h", "[rows, 2 * intermediate]")
    check_dtype(h, torch.bfloat16, "silu_mul", "h")
    check(
        h.shape[1] % (2 * QUANT_BLOCK) == 0,
        "silu_mul",
        f"h's width must be 2 * intermediate with intermediate a multiple of 128, got {h.shape[1]}",
    )


@register_fake("silu_mul")
def _silu_mul_fake(h, expert_offsets, quantize, pow2_scale):
    _check_silu_args(h, expert_offsets)
    rows, inter = h.shape[0], h.shape[1] // 2
    out = h.new_empty((rows, inter), dtype=FP8 if quantize else torch.bfloat16)
    return out, h.new_empty((rows if quantize else 0, inter // QUANT_BLOCK), dtype=torch.float32)


@register_cpu("silu_mul")
def _silu_mul_cpu(h, expert_offsets, quantize, pow2_scale):
    _check_silu_args(h, expert_offsets)
    act = reference.silu_and_mul(h)
    if quantize:
        return reference.quantize_fp8(act, pow2_scale)
    return act.to(torch.bfloat16), h.new_empty((0, act.shape[1] // QUANT_BLOCK), dtype=torch.float32)
