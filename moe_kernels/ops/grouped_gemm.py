"""Grouped GEMMs over permuted rows, the SwiGLU between them, and their backward (DESIGN.md §3).

Rows of expert e are [expert_offsets[e], expert_offsets[e+1]) of ``a``; offsets live on the device
and are never read on the host, so every op here is CUDA-graph capturable. ``grouped_gemm`` (BF16)
and ``silu_mul`` (bf16 out) are differentiable: their backward runs ``grouped_gemm_dgrad``,
``grouped_gemm_wgrad`` and ``silu_mul_backward``. The FP8 training path (DeepSeek-V3's recipe) is
``moe_kernels.layers.fp8_training``.
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
    "fp8_wgmma_128x192",
    "fp8_wgmma_kc_128x192",
    "fp8_wgmma_2cta_kc_128x192",
    "fp8_wgmma_mpair_kc_128x192",
    "fp8_wgmma_tall_kc_128x128",
    "fp8_wgmma_tall_b6_kc_128x128",
    "fp8_wgmma_tall_b8_kc_128x128",
    "fp8_wgmma_tall_b6_swap_kc_128x128",
    "bf16_cooperative_128x128",
    "bf16_cooperative_128x256",
    "bf16_pingpong_64x128",
    "bf16_wgmma_128x256",
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
    """out[rows of e] = a[rows of e] @ b[e]^T for every expert e, in one kernel (CUTLASS, or our own
    wgmma kernels: the ``fp8_wgmma_*`` and ``bf16_wgmma_*`` configurations).

    Args:
        a: [M, K] float8_e4m3fn or bfloat16, contiguous; K a multiple of 128.
        b: [E, N, K] same dtype, contiguous (transformers 5.x expert layout); N a multiple of 128.
        expert_offsets: int32 [E + 1] on a's device: rows of expert e are [offsets[e], offsets[e+1]).
            Any offsets work (empty experts, padding rows, a tail of unused rows after offsets[E]).
        a_scales: FP8 only, fp32 [M, K/128] (1x128 blocks, ``quantize_fp8``).
        b_scales: FP8 only, fp32 [E, N/128, K/128] (128x128 blocks, DeepSeek-V3's weight_scale_inv).
        out: optional bf16 [M, N] to write into.
        config: "auto" (rows per expert M/E decides, see csrc/gemm/grouped_gemm.cu) or a tile
            configuration name from GEMM_CONFIGS (the ``fp8_wgmma_*`` and ``bf16_wgmma_*`` ones take
            at most 1024 experts).
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


def grouped_gemm_dgrad(grad_out: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """The gradient of grouped_gemm's a (BF16): grad_a[rows of e] = grad_out[rows of e] @ b[e].

    grad_out bf16 [M, N], b bf16 [E, N, K] (the forward's weight, read untransposed by the kernel).
    Returns bf16 [M, K]; rows outside the experts are zero. (FP8 dgrad is the forward kernel on a
    transposed weight copy: ``moe_kernels.layers.fp8_training``.)"""
    raise_pending_device_error()
    return torch.ops.moe_kernels.grouped_gemm_dgrad(grad_out, b, expert_offsets)


def grouped_gemm_wgrad(
    grad_out: torch.Tensor,
    a: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    a_scales: torch.Tensor | None = None,
    fp8: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
    pow2_scale: bool = False,
    config: str = "auto",
) -> torch.Tensor:
    """The gradient of grouped_gemm's b: grad_b[e] = grad_out[rows of e]^T @ a[rows of e] -> [E, N, K].

    One grouped GEMM whose reduction length is each expert's row count, read from the device offsets
    (no host sync); fp32 accumulation, out_dtype bfloat16 or float32 (for a master-weight
    optimiser); an expert without rows gets zeros.

    Args:
        grad_out: bf16 [M, N]. a: bf16 [M, K], or (fp8=True only) e4m3 with its 1x128 a_scales.
        fp8: DeepSeek-V3's FP8 wgrad: both operands transposed and quantised per 128 rows of each
            expert (``quantize_fp8_transposed``, one kernel each), then the FP8 GEMM.
        config: "auto" (cooperative tiles) or "pingpong" (bf16 out only: each tile's epilogue
            overlaps the other tile's MMAs, for short reductions).
    """
    raise_pending_device_error()
    if not fp8:
        check(a_scales is None, "grouped_gemm_wgrad", "a_scales is for fp8=True (an e4m3 a)")
        return torch.ops.moe_kernels.grouped_gemm_wgrad(grad_out, a, expert_offsets, out_dtype, config)
    grad_t, grad_t_scales, padded = torch.ops.moe_kernels.quantize_fp8_transposed(
        grad_out, None, expert_offsets, pow2_scale
    )
    act_t, act_t_scales, _ = torch.ops.moe_kernels.quantize_fp8_transposed(
        a, a_scales, expert_offsets, pow2_scale
    )
    return torch.ops.moe_kernels.grouped_gemm_wgrad_fp8(
        grad_t, grad_t_scales, act_t, act_t_scales, padded, grad_out.shape[1], a.shape[1], out_dtype, config
    )


def silu_mul_backward(
    grad_act: torch.Tensor,
    h: torch.Tensor,
    expert_offsets: torch.Tensor | None = None,
    *,
    return_act: bool = False,
    quantize: bool = False,
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """SwiGLU backward in one kernel: (grad_h bf16 [M, 2I], act, grad_h_fp8, grad_h_scales).

    grad_h = [grad * up * s * (1 + gate * (1 - s)) | grad * SiLU(gate)], s = sigmoid(gate), in fp32.
    return_act: also the activation SiLU(gate) * up recomputed in bf16 (the down projection's wgrad
    operand, so the forward need not keep it). quantize: also grad_h in e4m3 with 1x128 scales (the
    gate_up dgrad's FP8 operand). Only rows in [offsets[0], offsets[E]) are written."""
    grad_h, act, grad_q, grad_scales = torch.ops.moe_kernels.silu_mul_backward(
        grad_act, h, expert_offsets, return_act, quantize, pow2_scale
    )
    return (
        grad_h,
        act if return_act else None,
        grad_q if quantize else None,
        grad_scales if quantize else None,
    )


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
    _check_offsets(expert_offsets, b.shape[0], op)
    fp8 = a.dtype == FP8
    check(
        fp8 == (a_scales is not None) and fp8 == (b_scales is not None),
        op,
        "FP8 operands need a_scales and b_scales" if fp8 else "bfloat16 operands take no scales",
    )
    if fp8:
        m, e = a.shape[0], b.shape[0]
        check(
            tuple(a_scales.shape) == (m, k // QUANT_BLOCK),
            op,
            f"a_scales must be [rows={m}, K/128={k // QUANT_BLOCK}] (1x128 blocks), "
            f"got shape {list(a_scales.shape)}",
        )
        expected = (e, n // QUANT_BLOCK, k // QUANT_BLOCK)
        check(
            tuple(b_scales.shape) == expected,
            op,
            f"b_scales must be {list(expected)} (128x128 blocks), got shape {list(b_scales.shape)}",
        )
    check(config in GEMM_CONFIGS, op, f"config must be one of {GEMM_CONFIGS}, got {config!r}")


def _check_gemm_out(a, b, out):
    m, n = a.shape[0], b.shape[1]
    check(
        out.dtype == torch.bfloat16 and tuple(out.shape) == (m, n) and out.is_contiguous(),
        "grouped_gemm",
        f"out must be a contiguous bfloat16 [rows={m}, N={n}] tensor, got {out.dtype} {list(out.shape)}",
    )


@register_fake("grouped_gemm")
def _grouped_gemm_fake(a, b, expert_offsets, a_scales, b_scales, config="auto"):
    _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


@register_fake("grouped_gemm_out")
def _grouped_gemm_out_fake(a, b, expert_offsets, a_scales, b_scales, out, config="auto"):
    _check_gemm_args(a, b, expert_offsets, a_scales, b_scales, config)
    _check_gemm_out(a, b, out)


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
    _check_gemm_out(a, b, out)
    _check_offset_values(a, expert_offsets)
    result = reference.grouped_gemm(a, b, expert_offsets, a_scales=a_scales, b_scales=b_scales)
    lo, hi = int(expert_offsets[0]), int(expert_offsets[-1])
    out[lo:hi] = result[lo:hi]


def _check_silu_args(h, expert_offsets, op="silu_mul"):
    check_dim(h, 2, op, "h", "[rows, 2 * intermediate]")
    check_dtype(h, torch.bfloat16, op, "h")
    check(
        h.shape[1] % (2 * QUANT_BLOCK) == 0,
        op,
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


# -- backward ops ------------------------------------------------------------------------------------


def _check_offsets(expert_offsets, num_experts, op):
    check_dtype(expert_offsets, torch.int32, op, "expert_offsets")
    check(
        tuple(expert_offsets.shape) == (num_experts + 1,),
        op,
        f"expert_offsets must be [experts + 1 = {num_experts + 1}], got shape {list(expert_offsets.shape)}",
    )


def _check_grouped_offsets(expert_offsets, op, name="expert_offsets"):
    """Offsets whose length gives the expert count (the wgrads): int32 [E + 1] with E >= 1."""
    check_dtype(expert_offsets, torch.int32, op, name)
    check(
        expert_offsets.dim() == 1 and expert_offsets.shape[0] >= 2,
        op,
        f"{name} must be [experts + 1] with at least one expert, got shape {list(expert_offsets.shape)}",
    )


def _check_multiple_of_128(op, **sizes):
    for name, size in sizes.items():
        check(
            size % QUANT_BLOCK == 0 and size > 0, op, f"{name} must be a positive multiple of 128, got {size}"
        )


WGRAD_CONFIGS = ("auto", "pingpong")


def _check_wgrad_options(out_dtype, config, op):
    check(
        out_dtype in (torch.bfloat16, torch.float32),
        op,
        f"out_dtype must be bfloat16 or float32, got {out_dtype}",
    )
    check(config in WGRAD_CONFIGS, op, f"config must be 'auto' or 'pingpong', got {config!r}")
    check(
        not (config == "pingpong" and out_dtype == torch.float32),
        op,
        "the pingpong configuration writes bfloat16 only",
    )


def _check_dgrad_args(grad_out, b, expert_offsets):
    op = "grouped_gemm_dgrad"
    check_dim(grad_out, 2, op, "grad_out", "[rows, N]")
    check_dim(b, 3, op, "b", "[experts, N, K]")
    check_dtype(grad_out, torch.bfloat16, op, "grad_out")
    check_dtype(b, torch.bfloat16, op, "b")
    check(
        grad_out.shape[1] == b.shape[1],
        op,
        f"grad_out must be [rows, N={b.shape[1]}], got shape {list(grad_out.shape)}",
    )
    _check_multiple_of_128(op, N=b.shape[1], K=b.shape[2])
    check(b.shape[0] >= 1, op, "b must hold at least one expert")
    _check_offsets(expert_offsets, b.shape[0], op)


@register_fake("grouped_gemm_dgrad")
def _grouped_gemm_dgrad_fake(grad_out, b, expert_offsets):
    _check_dgrad_args(grad_out, b, expert_offsets)
    return grad_out.new_empty((grad_out.shape[0], b.shape[2]))


@register_cpu("grouped_gemm_dgrad")
def _grouped_gemm_dgrad_cpu(grad_out, b, expert_offsets):
    _check_dgrad_args(grad_out, b, expert_offsets)
    _check_offset_values(grad_out, expert_offsets)
    return reference.grouped_gemm_dgrad(grad_out, b, expert_offsets)


def _check_wgrad_args(grad_out, a, expert_offsets, out_dtype, config):
    op = "grouped_gemm_wgrad"
    check_dim(grad_out, 2, op, "grad_out", "[rows, N]")
    check_dim(a, 2, op, "a", "[rows, K]")
    check_dtype(grad_out, torch.bfloat16, op, "grad_out")
    check_dtype(a, torch.bfloat16, op, "a")
    check(
        a.shape[0] == grad_out.shape[0],
        op,
        f"a must have grad_out's {grad_out.shape[0]} rows, got {a.shape[0]}",
    )
    _check_multiple_of_128(op, N=grad_out.shape[1], K=a.shape[1])
    _check_grouped_offsets(expert_offsets, op)
    _check_wgrad_options(out_dtype, config, op)


@register_fake("grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(grad_out, a, expert_offsets, out_dtype, config="auto"):
    _check_wgrad_args(grad_out, a, expert_offsets, out_dtype, config)
    shape = (expert_offsets.shape[0] - 1, grad_out.shape[1], a.shape[1])
    return grad_out.new_empty(shape, dtype=out_dtype)


@register_cpu("grouped_gemm_wgrad")
def _grouped_gemm_wgrad_cpu(grad_out, a, expert_offsets, out_dtype, config="auto"):
    _check_wgrad_args(grad_out, a, expert_offsets, out_dtype, config)
    _check_offset_values(grad_out, expert_offsets)
    return reference.grouped_gemm_wgrad(grad_out, a, expert_offsets, out_dtype)


def _check_wgrad_fp8_args(grad_t, grad_t_scales, act_t, act_t_scales, padded, n, k, out_dtype, config):
    op = "grouped_gemm_wgrad_fp8"
    _check_multiple_of_128(op, n=n, k=k)
    capacity = grad_t.numel() // n
    for name, t, scales, width in (("grad_t", grad_t, grad_t_scales, n), ("act_t", act_t, act_t_scales, k)):
        check_dtype(t, FP8, op, name)
        check_dtype(scales, torch.float32, op, f"{name}_scales")
        check(
            t.dim() == 1 and t.numel() == capacity * width and capacity % QUANT_BLOCK == 0,
            op,
            f"{name} must be quantize_fp8_transposed's flat output for {width} channels and the capacity "
            f"of grad_t, got shape {list(t.shape)}",
        )
        check(
            scales.dim() == 1 and scales.numel() == capacity // QUANT_BLOCK * width,
            op,
            f"{name}_scales must be [{capacity // QUANT_BLOCK * width}], got shape {list(scales.shape)}",
        )
    _check_grouped_offsets(padded, op, "padded_offsets")
    _check_wgrad_options(out_dtype, config, op)


@register_fake("grouped_gemm_wgrad_fp8")
def _grouped_gemm_wgrad_fp8_fake(
    grad_t, grad_t_scales, act_t, act_t_scales, padded, n, k, out_dtype, config="auto"
):
    _check_wgrad_fp8_args(grad_t, grad_t_scales, act_t, act_t_scales, padded, n, k, out_dtype, config)
    return grad_t.new_empty((padded.shape[0] - 1, n, k), dtype=out_dtype)


@register_cpu("grouped_gemm_wgrad_fp8")
def _grouped_gemm_wgrad_fp8_cpu(
    grad_t, grad_t_scales, act_t, act_t_scales, padded, n, k, out_dtype, config="auto"
):
    _check_wgrad_fp8_args(grad_t, grad_t_scales, act_t, act_t_scales, padded, n, k, out_dtype, config)
    return reference.grouped_gemm_wgrad_fp8(
        grad_t, grad_t_scales, act_t, act_t_scales, padded, n, k, out_dtype
    )


def _check_silu_backward_args(grad_act, h, expert_offsets):
    op = "silu_mul_backward"
    _check_silu_args(h, expert_offsets, op)
    check_dtype(grad_act, torch.bfloat16, op, "grad_act")
    expected = (h.shape[0], h.shape[1] // 2)
    check(
        tuple(grad_act.shape) == expected,
        op,
        f"grad_act must be [rows, intermediate] = {list(expected)}, got shape {list(grad_act.shape)}",
    )


@register_fake("silu_mul_backward")
def _silu_mul_backward_fake(grad_act, h, expert_offsets, return_act, quantize, pow2_scale):
    _check_silu_backward_args(grad_act, h, expert_offsets)
    rows, width = h.shape
    return (
        h.new_empty((rows, width)),
        h.new_empty((rows if return_act else 0, width // 2)),
        h.new_empty((rows if quantize else 0, width), dtype=FP8),
        h.new_empty((rows if quantize else 0, width // QUANT_BLOCK), dtype=torch.float32),
    )


@register_cpu("silu_mul_backward")
def _silu_mul_backward_cpu(grad_act, h, expert_offsets, return_act, quantize, pow2_scale):
    _check_silu_backward_args(grad_act, h, expert_offsets)
    grad_h, act = reference.silu_mul_backward(grad_act, h)
    rows, width = h.shape
    grad_q, grad_scales = (
        reference.quantize_fp8(grad_h, pow2_scale)
        if quantize
        else (h.new_empty((0, width), dtype=FP8), h.new_empty((0, width // QUANT_BLOCK), dtype=torch.float32))
    )
    act = act.to(torch.bfloat16) if return_act else h.new_empty((0, width // 2))
    return grad_h.to(torch.bfloat16), act, grad_q, grad_scales


# ------------------------------------------------------------------------------------------------
# Autograd (BF16): dgrad and wgrad for grouped_gemm, the SwiGLU backward for silu_mul
# ------------------------------------------------------------------------------------------------


def _grouped_gemm_setup_context(ctx, inputs, output):
    a, b, expert_offsets = inputs[:3]
    check(
        a.dtype != FP8,
        "grouped_gemm",
        "FP8 operands are not differentiable; train FP8 experts through expert_mlp(..., fp8_training) "
        "or MoE(fp8_training=True) (DeepSeek-V3's recipe on bf16 weights)",
    )
    ctx.save_for_backward(a if b.requires_grad else None, b if a.requires_grad else None, expert_offsets)
    ctx.b_dtype = b.dtype


def _grouped_gemm_backward(ctx, grad_out):
    a, b, expert_offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.moe_kernels.grouped_gemm_dgrad(grad_out, b, expert_offsets)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.moe_kernels.grouped_gemm_wgrad(grad_out, a, expert_offsets, ctx.b_dtype)
    return grad_a, grad_b, None, None, None, None


torch.library.register_autograd(
    "moe_kernels::grouped_gemm", _grouped_gemm_backward, setup_context=_grouped_gemm_setup_context
)


def _silu_mul_setup_context(ctx, inputs, output):
    h, expert_offsets, quantize, _ = inputs
    check(
        not (quantize and h.requires_grad),
        "silu_mul",
        "the FP8 output (quantize=True) is not differentiable; use quantize=False where a gradient is needed",
    )
    ctx.save_for_backward(h, expert_offsets)


def _silu_mul_backward(ctx, grad_act, grad_scales):
    h, expert_offsets = ctx.saved_tensors
    grad_h, _, _, _ = torch.ops.moe_kernels.silu_mul_backward(
        grad_act.contiguous(), h, expert_offsets, False, False, False
    )
    return grad_h, None, None, None


torch.library.register_autograd(
    "moe_kernels::silu_mul", _silu_mul_backward, setup_context=_silu_mul_setup_context
)
