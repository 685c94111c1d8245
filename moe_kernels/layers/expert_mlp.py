"""The expert MLP on permuted rows (grouped GEMM + SwiGLU ops), and the routed path around it."""

import torch

from moe_kernels._checks import FP8, check, check_dim
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
    try:
        h = grouped_gemm(x, w_gate_up, expert_offsets, a_scales=x_scales, b_scales=w_gate_up_scales)
        act, act_scales = silu_mul(h, expert_offsets, quantize=fp8, pow2_scale=pow2_scale)
        return grouped_gemm(act, w_down, expert_offsets, a_scales=act_scales, b_scales=w_down_scales)
    except ValueError:
        # The ops name their own arguments (a, b, h); say which of expert_mlp's is wrong, if one is.
        # Checked only here, so the layer's forward pays nothing for it.
        _check_expert_mlp_args(
            x, expert_offsets, w_gate_up, w_down, x_scales, w_gate_up_scales, w_down_scales
        )
        raise


def _check_expert_mlp_args(x, expert_offsets, w_gate_up, w_down, x_scales, w_gate_up_scales, w_down_scales):
    """The shapes and dtypes that tie expert_mlp's arguments together, named as its caller knows them
    (the grouped GEMMs check the rest, under their own argument names)."""
    op = "expert_mlp"
    check_dim(x, 2, op, "x", "[rows, hidden]")
    check_dim(expert_offsets, 1, op, "expert_offsets", "[experts + 1]")
    check_dim(w_gate_up, 3, op, "w_gate_up", "[experts, 2 * intermediate, hidden]")
    check_dim(w_down, 3, op, "w_down", "[experts, hidden, intermediate]")
    experts, two_i, hidden = w_gate_up.shape
    check(
        w_down.shape[0] == experts and expert_offsets.shape[0] == experts + 1,
        op,
        f"w_gate_up, w_down and expert_offsets must agree on the experts: w_gate_up has {experts}, "
        f"w_down {w_down.shape[0]}, expert_offsets {expert_offsets.shape[0]} entries (experts + 1)",
    )
    check(
        hidden == x.shape[1] and two_i % 2 == 0,
        op,
        f"w_gate_up must be [experts, 2 * intermediate, hidden={x.shape[1]}] (x's hidden size), "
        f"got shape {list(w_gate_up.shape)}",
    )
    check(
        tuple(w_down.shape) == (experts, hidden, two_i // 2),
        op,
        f"w_down must be [experts={experts}, hidden={hidden}, intermediate={two_i // 2}] to match "
        f"w_gate_up {list(w_gate_up.shape)}, got shape {list(w_down.shape)}",
    )
    fp8_weights = w_gate_up.dtype == FP8
    check(
        w_down.dtype == w_gate_up.dtype and (x.dtype == FP8) == fp8_weights,
        op,
        "x, w_gate_up and w_down must all be bfloat16 or all float8_e4m3fn, got "
        + ", ".join(str(t.dtype).removeprefix("torch.") for t in (x, w_gate_up, w_down)),
    )
    if fp8_weights:
        check(
            x_scales is not None,
            op,
            "float8_e4m3fn x needs x_scales (permute(..., quantize=True) gives them)",
        )
        check(
            w_gate_up_scales is not None and w_down_scales is not None,
            op,
            "float8_e4m3fn weights need w_gate_up_scales and w_down_scales (128x128 blocks)",
        )


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
