"""FP8 training of the routed experts, DeepSeek-V3's recipe (§3.3 of its report), on our kernels.

    forward:  x 1x128 e4m3 (fused into permute) -> gate_up (FP8 GEMM) -> SwiGLU, requantised 1x128
              -> down (FP8 GEMM)
    backward: grad_y 1x128 -> dgrad of down (forward kernel on the transposed FP8 weight)
              -> SwiGLU backward (+ grad_h 1x128 in the same pass) -> dgrad of gate_up
              wgrads: BF16 GEMMs on the bf16 gradients and the cached FP8 activations dequantised
              (default: faster on the H200 than the FP8 wgrad, see bench/results/train.json), or
              with fp8_wgrad=True DeepSeek-V3's FP8 wgrad: both operands transposed and quantised per
              128 rows of each expert (128x1 tiles), the cached FP8 activations dequantised and
              requantised in the same kernel.

The weights are the bf16 master parameters; their 128x128 e4m3 copies, and the transposed copies
the dgrad needs (the block scales are unchanged by a transpose), are made once per weight version,
i.e. once per optimiser step however many micro-batches run. The forward keeps the e4m3 input and
the bf16 gate_up output (the SwiGLU's input; its output is recomputed in the backward), no bf16 copy
of the input. Frozen FP8 weights (a quantised checkpoint) work too: the input still gets its
gradient, the weights none.
"""

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from moe_kernels._checks import FP8, check
from moe_kernels.ops.grouped_gemm import grouped_gemm, grouped_gemm_wgrad, silu_mul, silu_mul_backward
from moe_kernels.ops.permute import permute, unpermute
from moe_kernels.ops.quant import dequantize_fp8, quantize_fp8, quantize_fp8_weight_transposed


@dataclass(frozen=True)
class FP8Weight:
    """A weight [E, N, K] in e4m3 with 128x128 scales, and its transpose [E, K, N] (the dgrad's B)."""

    q: torch.Tensor
    scales: torch.Tensor
    q_t: torch.Tensor
    scales_t: torch.Tensor


# weight tensor -> (its version when quantised, FP8Weight); entries go with their weights.
_CACHE = WeakIdKeyDictionary()


def fp8_weight(w: torch.Tensor, scales: torch.Tensor | None = None, *, pow2_scale: bool = False) -> FP8Weight:
    """The FP8 copies of an expert weight, made once per version of ``w`` (an optimiser step, or any
    in-place change, bumps it). w: bf16 [E, N, K], or e4m3 with its 128x128 ``scales`` (frozen)."""
    key = (w._version, w.data_ptr(), pow2_scale, None if scales is None else scales._version)
    hit = _CACHE.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    weight = make_fp8_weight(w, scales, pow2_scale=pow2_scale)
    _CACHE[w] = (key, weight)
    return weight


@torch.no_grad()
def make_fp8_weight(
    w: torch.Tensor, scales: torch.Tensor | None = None, *, pow2_scale: bool = False
) -> FP8Weight:
    """``fp8_weight`` without the cache: what each optimiser step pays once per expert weight."""
    if w.dtype == FP8:
        check(scales is not None, "fp8_weight", "an e4m3 weight needs its 128x128 scales")
        q, s = w, scales
        # a checkpoint's e4m3 transposes as bytes (torch copies float8 like any 1-byte type)
        q_t = q.view(torch.uint8).transpose(1, 2).contiguous().view(FP8)
    else:  # both layouts from one read of the bf16 weight
        q, s, q_t = quantize_fp8_weight_transposed(w.detach(), pow2_scale=pow2_scale)
    return FP8Weight(q, s, q_t, s.transpose(1, 2).contiguous())


class _FP8ExpertMLP(torch.autograd.Function):
    """The expert MLP on FP8 permuted rows, differentiable in the bf16 input it was permuted from
    (``tokens`` through ``row_map``, or the rows themselves when row_map is None) and in the
    bf16 master weights."""

    @staticmethod
    def forward(
        ctx, tokens, w_gate_up, w_down, x_q, x_scales, offsets, row_map, gate_up, down, pow2_scale, fp8_wgrad
    ):
        h = grouped_gemm(x_q, gate_up.q, offsets, a_scales=x_scales, b_scales=gate_up.scales)
        act, act_scales = silu_mul(h, offsets, quantize=True, pow2_scale=pow2_scale)
        y = grouped_gemm(act, down.q, offsets, a_scales=act_scales, b_scales=down.scales)
        ctx.save_for_backward(x_q, x_scales, offsets, row_map, h)
        ctx.weights = (gate_up, down)
        ctx.pow2_scale = pow2_scale
        ctx.fp8_wgrad = fp8_wgrad
        ctx.weight_dtypes = (w_gate_up.dtype, w_down.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_q, x_scales, offsets, row_map, h = ctx.saved_tensors
        gate_up, down = ctx.weights
        pow2 = ctx.pow2_scale
        needs_x, needs_gate_up, needs_down = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        grad_y_q, grad_y_scales = quantize_fp8(grad_y, pow2_scale=pow2)
        grad_act = grouped_gemm(grad_y_q, down.q_t, offsets, a_scales=grad_y_scales, b_scales=down.scales_t)
        grad_h, act, grad_h_q, grad_h_scales = silu_mul_backward(
            grad_act, h, offsets, return_act=needs_down, quantize=needs_x, pow2_scale=pow2
        )
        grad_tokens = grad_gate_up = grad_down = None
        wgrad = dict(fp8=ctx.fp8_wgrad, pow2_scale=pow2)
        if needs_down:
            grad_down = grouped_gemm_wgrad(grad_y, act, offsets, out_dtype=ctx.weight_dtypes[1], **wgrad)
        if needs_gate_up:
            if ctx.fp8_wgrad:  # the cached e4m3 rows, requantised 128x1 in the transposing kernel
                x, x_arg = x_q, dict(a_scales=x_scales)
            else:
                x, x_arg = dequantize_fp8(x_q, x_scales), {}
            grad_gate_up = grouped_gemm_wgrad(
                grad_h, x, offsets, out_dtype=ctx.weight_dtypes[0], **x_arg, **wgrad
            )
        if needs_x:
            # Rows outside the experts get no product. Permute's backward reads only the rows the
            # pairs were permuted to (all inside the experts), so only a caller's own rows need zeros.
            dgrad = dict(a_scales=grad_h_scales, b_scales=gate_up.scales_t)
            if row_map is None:
                grad_x = torch.zeros(x_q.shape, dtype=torch.bfloat16, device=x_q.device)
                grouped_gemm(grad_h_q, gate_up.q_t, offsets, **dgrad, out=grad_x)
                grad_tokens = grad_x
            else:
                grad_tokens = unpermute(grouped_gemm(grad_h_q, gate_up.q_t, offsets, **dgrad), row_map)
        return grad_tokens, grad_gate_up, grad_down, None, None, None, None, None, None, None, None


def fp8_expert_mlp(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    w_gate_up_scales: torch.Tensor | None = None,
    w_down_scales: torch.Tensor | None = None,
    pow2_scale: bool = False,
    fp8_wgrad: bool = False,
) -> torch.Tensor:
    """``expert_mlp`` in DeepSeek-V3's FP8 recipe, differentiable: x bf16 permuted rows [M, H]
    (quantised 1x128 here), w_gate_up [E, 2I, H] and w_down [E, H, I] bf16 master weights (or e4m3
    with their 128x128 scales, frozen). Returns bf16 [M, H]; rows outside the experts unspecified.
    fp8_wgrad: the weight gradients in FP8 too (DeepSeek-V3's 128x1 wgrad) instead of BF16 GEMMs."""
    check(x.dtype == torch.bfloat16, "fp8_expert_mlp", f"x must be bfloat16, got {x.dtype}")
    x_q, x_scales = quantize_fp8(x.detach(), pow2_scale=pow2_scale)
    return _apply(
        x,
        x_q,
        x_scales,
        expert_offsets,
        None,
        w_gate_up,
        w_down,
        w_gate_up_scales,
        w_down_scales,
        pow2_scale,
        fp8_wgrad,
    )


def fp8_routed_expert_mlp(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    w_gate_up_scales: torch.Tensor | None = None,
    w_down_scales: torch.Tensor | None = None,
    num_local_experts: int | None = None,
    pow2_scale: bool = False,
    fp8_wgrad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [T, H] bf16 -> (y bf16 [R, H] in permuted order, row_map [T, K]) like
    ``routed_expert_mlp``, in the FP8 recipe and differentiable in the tokens and bf16 weights: permute
    quantises 1x128 in its copy pass; the backward sums each token's row gradients (permute's)."""
    r = permute(
        tokens.detach(),
        expert_ids,
        num_experts,
        quantize=True,
        pow2_scale=pow2_scale,
        num_local_experts=num_local_experts,
    )
    y = _apply(
        tokens,
        r.out,
        r.out_scales,
        r.expert_offsets,
        r.row_map,
        w_gate_up,
        w_down,
        w_gate_up_scales,
        w_down_scales,
        pow2_scale,
        fp8_wgrad,
    )
    return y, r.row_map


def _apply(
    tokens,
    x_q,
    x_scales,
    offsets,
    row_map,
    w_gate_up,
    w_down,
    gate_up_scales,
    down_scales,
    pow2_scale,
    fp8_wgrad,
):
    gate_up = fp8_weight(w_gate_up, gate_up_scales, pow2_scale=pow2_scale)
    down = fp8_weight(w_down, down_scales, pow2_scale=pow2_scale)
    return _FP8ExpertMLP.apply(
        tokens, w_gate_up, w_down, x_q, x_scales, offsets, row_map, gate_up, down, pow2_scale, fp8_wgrad
    )
