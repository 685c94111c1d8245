"""The expert MLP on permuted rows (grouped GEMM + SwiGLU ops), and the routed path around it."""

import torch

from moe_kernels._checks import FP8
from moe_kernels.layers.fp8_training import fp8_routed_expert_mlp
from moe_kernels.ops.grouped_gemm import grouped_gemm, silu_mul
from moe_kernels.ops.permute import permute


def expert_mlp(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    x_scales: torch.Tensor | None = None,
    w_gate_up_scales: torch.Tensor | None = None,
    w_down_scales: torch.Tensor | None = None,
    pow2_scale: bool = False,
) -> torch.Tensor:
    """The DeepSeekMoE expert MLP on permuted rows: down(SiLU(gate) * up), three kernels.

    Args:
        x: permuted rows [M, H], bf16 (BF16 path) or e4m3 with x_scales [M, H/128] (FP8 path;
            ``permute(..., quantize=True)`` produces both).
        expert_offsets: int32 [E + 1] on the device.
        w_gate_up: [E, 2I, H] (first I rows gate, next I up); w_down: [E, H, I]. bf16, or e4m3 with
            w_*_scales in 128x128 blocks (DeepSeek-V3 FP8 checkpoints' weight + weight_scale_inv).
    Returns:
        bf16 [M, H]; rows outside the experts are unspecified. Matches ``reference.expert_mlp``.
    BF16 is differentiable (x and both weights). FP8 training: ``layers.fp8_training.fp8_expert_mlp``.
    """
    fp8 = x.dtype == FP8
    h = grouped_gemm(x, w_gate_up, expert_offsets, a_scales=x_scales, b_scales=w_gate_up_scales)
    act, act_scales = silu_mul(h, expert_offsets, quantize=fp8, pow2_scale=pow2_scale)
    return grouped_gemm(act, w_down, expert_offsets, a_scales=act_scales, b_scales=w_down_scales)


def routed_expert_mlp(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    w_gate_up_scales: torch.Tensor | None = None,
    w_down_scales: torch.Tensor | None = None,
    num_local_experts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens to expert outputs: permute (quantised 1x128 in the same pass when the weights are
    FP8), then expert_mlp. Returns (y bf16 [R, H] in permuted order, row_map int32 [T, K]), what
    ``unpermute`` combines. Ids of experts outside [0, num_local_experts) are dropped (permute).
    Differentiable in x (and bf16 weights); x's gradient through FP8 weights uses the FP8 recipe's
    backward (``fp8_training``)."""
    if w_gate_up.dtype == FP8 and torch.is_grad_enabled() and x.requires_grad:
        return fp8_routed_expert_mlp(
            x,
            expert_ids,
            num_experts,
            w_gate_up,
            w_down,
            w_gate_up_scales=w_gate_up_scales,
            w_down_scales=w_down_scales,
            num_local_experts=num_local_experts,
        )
    r = permute(
        x, expert_ids, num_experts, quantize=w_gate_up.dtype == FP8, num_local_experts=num_local_experts
    )
    y = expert_mlp(
        r.out,
        r.expert_offsets,
        w_gate_up,
        w_down,
        x_scales=r.out_scales,
        w_gate_up_scales=w_gate_up_scales,
        w_down_scales=w_down_scales,
    )
    return y, r.row_map
