"""Permute / unpermute: the rows of the (token, k) pairs grouped by expert, and the weighted combine
back to tokens (DESIGN.md §3), with their fake kernels, CPU implementations and autograd."""

from typing import NamedTuple

import torch

from moe_kernels import reference
from moe_kernels._checks import (
    FP8,
    QUANT_BLOCK,
    check,
    check_permute_args,
    check_unpermute_args,
    check_unpermute_backward_args,
)
from moe_kernels.ops._library import register_cpu, register_fake
from moe_kernels.ops.device_error import raise_pending_device_error


class PermuteResult(NamedTuple):
    """What permute returns (see its docstring for shapes and dtypes)."""

    out: torch.Tensor
    out_scales: torch.Tensor | None
    expert_offsets: torch.Tensor
    row_map: torch.Tensor


def permute(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    align: int = 1,
    quantize: bool = False,
    pow2_scale: bool = False,
    x_scales: torch.Tensor | None = None,
    num_out_rows: int | None = None,
    first_expert: int = 0,
    num_local_experts: int | None = None,
) -> PermuteResult:
    """Copy each token's row to one row per (token, k) pair, grouped by expert.

    Rows are ordered by local expert ascending, then by pair index t*K + k (stable: the same bytes
    on every run). Each expert's rows are padded to a multiple of `align` with zero rows.

    Args:
        x: [T, H] bfloat16, float16 or float32 (H a multiple of 16 bytes: 8 elements for 2-byte
            types), or float8_e4m3fn with `x_scales` (H a multiple of 128). T may be 0.
        expert_ids: [T, K] int32 or int64, 1 <= K <= 32; -1 means dropped. Ids of experts outside
            the local range are dropped too.
        num_experts: E, the number of experts of the model; ids must lie in [-1, E).
        align: 1, 16, 64 or 128: rows per expert are padded to a multiple of it (zero rows; FP8: zero
            bytes with scale 1), as grouped GEMMs with per-expert tiles want.
        quantize: write e4m3 rows with 1x128 fp32 scales, quantised in the same pass (H a multiple of
            128); the math of ``quantize_fp8``, bit for bit.
        pow2_scale: with quantize, round each scale up to a power of two.
        x_scales: [T, H/128] float32, the 1x128 scales of an e4m3 x, moved with its rows.
        num_out_rows: R, the rows of `out`. Default: the bound T*K + E_local*(align - 1), exact for
            align = 1 when no pair is dropped. The op never syncs with the host, so R is fixed before
            the routing is known: rows at or past expert_offsets[-1] are left unwritten.
        first_expert, num_local_experts: keep only experts [first_expert, first_expert +
            num_local_experts) (an expert-parallel rank's share; default: all from first_expert on),
            at most 1024 of them.
    Returns:
        PermuteResult with
        out: [R, H], x's dtype, or float8_e4m3fn when quantize or x is e4m3;
        out_scales: [R, H/128] float32 when out is e4m3, else None;
        expert_offsets: int32 [E_local + 1] on x's device: expert e's rows are
            [expert_offsets[e], expert_offsets[e] + count); expert_offsets[-1] = rows used;
        row_map: int32 [T, K], the row of each pair, -1 where dropped. All unpermute needs.

    Errors found in device data do not sync: an id outside [-1, E) is dropped, and when the rows
    need more than R, the pairs that do not fit are dropped (row_map -1; expert_offsets clamped to
    R; nothing is written past R). Either stores a code in a sticky device-error flag; the next
    permute, unpermute or grouped_gemm call raises RuntimeError("permute: ... (detected on the
    device during an earlier call)"), and ``moe_kernels.check_device_errors()`` synchronises and
    raises at once. (The CPU implementation raises ValueError immediately.)

    Autograd: the gradient of x is the unweighted unpermute of the gradient of out (bfloat16,
    float16, float32). FP8 outputs are not differentiable: with quantize=True, x must not require grad.
    """
    num_local = num_experts - first_expert if num_local_experts is None else num_local_experts
    if num_out_rows is None:
        num_out_rows = reference.permute_rows_bound(expert_ids.numel(), num_local, align)
    raise_pending_device_error()
    out, out_scales, expert_offsets, row_map = torch.ops.moe_kernels.permute(
        x,
        x_scales,
        expert_ids,
        num_experts,
        first_expert,
        num_local,
        align,
        quantize,
        pow2_scale,
        num_out_rows,
    )
    fp8_out = quantize or x.dtype == FP8
    return PermuteResult(out, out_scales if fp8_out else None, expert_offsets, row_map)


def unpermute(
    y: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    shared_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine the pairs' rows back into tokens: out[t] = sum over k of weights[t, k] * y[row_map[t, k]].

    Args:
        y: [M, H] bfloat16, float16 or float32 (the expert outputs in permuted order).
        row_map: [T, K] int32 from permute; -1 pairs contribute nothing (their rows are never read,
            so padding rows may hold anything).
        weights: [T, K] float32, bfloat16 or float16 gate weights; None means 1.
        shared_output: [T, H], y's dtype: the shared experts' output, added to the sum (fused).
    Returns:
        [T, H] in y's dtype. The sum runs over k in order in fp32 (each product and each sum rounded
        on its own), then adds shared_output and rounds once: deterministic, and bit-exact with
        ``moe_kernels.reference.unpermute``.

    A row_map entry >= M is skipped and reported like permute's device-detected errors.
    Autograd: gradients for y (w[t, k] * grad[t] on each pair's row, zero elsewhere), weights (the
    dot of the row and grad[t], in fp32) and shared_output.
    """
    raise_pending_device_error()
    return torch.ops.moe_kernels.unpermute(y, row_map, weights, shared_output)


# ------------------------------------------------------------------------------------------------
# CPU implementations (the references) and fake kernels
# ------------------------------------------------------------------------------------------------


@register_cpu("permute")
def _permute_cpu(
    x,
    x_scales,
    expert_ids,
    num_experts,
    first_expert,
    num_local_experts,
    align,
    quantize,
    pow2_scale,
    num_out_rows,
):
    check_permute_args(
        x, x_scales, expert_ids, num_experts, first_expert, num_local_experts, align, quantize, num_out_rows
    )
    out, out_scales, expert_offsets, row_map = reference.permute(
        x,
        expert_ids,
        num_experts,
        align=align,
        x_scales=x_scales,
        quantize=quantize,
        pow2_scale=pow2_scale,
        num_out_rows=num_out_rows,
        first_expert=first_expert,
        num_local_experts=num_local_experts,
    )
    if out_scales is None:
        out_scales = x.new_empty(0, dtype=torch.float32)
    return out, out_scales, expert_offsets, row_map


@register_fake("permute")
def _permute_fake(
    x,
    x_scales,
    expert_ids,
    num_experts,
    first_expert,
    num_local_experts,
    align,
    quantize,
    pow2_scale,
    num_out_rows,
):
    check_permute_args(
        x, x_scales, expert_ids, num_experts, first_expert, num_local_experts, align, quantize, num_out_rows
    )
    fp8_out = quantize or x.dtype == FP8
    hidden = x.shape[1]
    out = x.new_empty((num_out_rows, hidden), dtype=FP8 if fp8_out else x.dtype)
    scales_shape = (num_out_rows, hidden // QUANT_BLOCK) if fp8_out else (0,)
    out_scales = x.new_empty(scales_shape, dtype=torch.float32)
    expert_offsets = x.new_empty((num_local_experts + 1,), dtype=torch.int32)
    row_map = x.new_empty(tuple(expert_ids.shape), dtype=torch.int32)
    return out, out_scales, expert_offsets, row_map


@register_cpu("unpermute")
def _unpermute_cpu(y, row_map, weights, shared_output):
    check_unpermute_args(y, row_map, weights, shared_output)
    # What the CUDA kernel flags on the device (and skips), raised at once here.
    check(
        bool((row_map < y.shape[0]).all()),
        "unpermute",
        f"row_map had rows >= the rows of y ({y.shape[0]}); such pairs would read past y",
    )
    return reference.unpermute(y, row_map, weights, shared_output=shared_output)


@register_fake("unpermute")
def _unpermute_fake(y, row_map, weights, shared_output):
    check_unpermute_args(y, row_map, weights, shared_output)
    return y.new_empty((row_map.shape[0], y.shape[1]))


@register_cpu("unpermute_backward")
def _unpermute_backward_cpu(grad_out, row_map, weights, y, num_rows):
    check_unpermute_backward_args(grad_out, row_map, weights, y, num_rows)
    return reference.unpermute_backward(grad_out, row_map, weights, y, num_rows)


@register_fake("unpermute_backward")
def _unpermute_backward_fake(grad_out, row_map, weights, y, num_rows):
    check_unpermute_backward_args(grad_out, row_map, weights, y, num_rows)
    grad_y = grad_out.new_empty((num_rows, grad_out.shape[1]))
    grad_weights = grad_out.new_empty(tuple(row_map.shape) if y is not None else (0,), dtype=torch.float32)
    return grad_y, grad_weights


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------


def _permute_setup_context(ctx, inputs, output):
    x, quantize = inputs[0], inputs[7]
    check(
        not (x.requires_grad and (quantize or x.dtype == FP8)),
        "permute",
        "FP8 outputs are not differentiable: with quantize=True pass x.detach() (or permute without "
        "quantize where a gradient is needed)",
    )
    ctx.save_for_backward(output[3])


def _permute_backward(ctx, grad_out, grad_out_scales, grad_expert_offsets, grad_row_map):
    (row_map,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moe_kernels.unpermute(grad_out, row_map, None, None)
    return grad_x, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "moe_kernels::permute", _permute_backward, setup_context=_permute_setup_context
)


def _unpermute_setup_context(ctx, inputs, output):
    y, row_map, weights, _shared_output = inputs
    ctx.num_rows = y.shape[0]
    weights_need_grad = weights is not None and weights.requires_grad
    ctx.save_for_backward(y if weights_need_grad else None, row_map, weights)


def _unpermute_backward(ctx, grad_out):
    y, row_map, weights = ctx.saved_tensors
    needs_y, _, needs_weights, needs_shared = ctx.needs_input_grad
    grad_y = grad_weights = None
    if needs_y or needs_weights:
        grad_y, grad_weights = torch.ops.moe_kernels.unpermute_backward(
            grad_out, row_map, weights, y if needs_weights else None, ctx.num_rows
        )
        grad_y = grad_y if needs_y else None
        grad_weights = grad_weights.to(weights.dtype) if needs_weights else None
    return grad_y, None, grad_weights, grad_out if needs_shared else None


torch.library.register_autograd(
    "moe_kernels::unpermute", _unpermute_backward, setup_context=_unpermute_setup_context
)
