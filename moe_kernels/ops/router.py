"""Fused MoE router, balance losses and the auxiliary-loss-free bias update (DESIGN.md §1-2)."""

import itertools
from typing import NamedTuple

import torch

from moe_kernels import reference
from moe_kernels._checks import check, check_dim, check_dtype
from moe_kernels.ops._library import register_cpu, register_fake
from moe_kernels.presets import PRESETS, RouterPreset


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # fp32 [T, K]
    ids: torch.Tensor  # int32 [T, K]
    counts: torch.Tensor | None  # int32 [E] when return_counts


def router(
    logits: torch.Tensor,
    top_k: int,
    *,
    bias: torch.Tensor | None = None,
    score_func: str = "softmax",
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
    renormalize: bool = True,
    scaling_factor: float = 1.0,
    return_counts: bool = False,
) -> RouterOutput:
    """Route tokens to experts in one fused kernel (semantics: DESIGN.md §2, ``reference.router``).

    Args:
        logits: [T, E] bf16, fp16 or fp32 router logits; 2 <= E <= 1024; T may be 0.
        top_k: experts per token K, 1 <= K <= min(16, E).
        bias: fp32 [E] expert bias added to the scores for selection only (DeepSeek-V3, Kimi-K2).
        score_func: "softmax" or "sigmoid" (computed in fp32).
        num_groups, topk_groups: group-limited routing: E split into num_groups (<= 32) equal groups,
            only the best topk_groups groups are eligible. group_score: "top2_sum" (DeepSeek-V3:
            sum of the top two biased scores) or "max" (DeepSeek-V2).
        renormalize: divide the K weights by their sum (+1e-20). scaling_factor: multiply them after.
        return_counts: also return the int32 [E] number of tokens routed to each expert.
    Returns:
        RouterOutput(weights fp32 [T, K], ids int32 [T, K], counts int32 [E] or None).
        Ties go to the lower expert index, NaN scores count as -inf, the K ids of a token are always
        distinct and in range. ``weights`` is differentiable w.r.t. ``logits`` (not ``bias``).
    """
    weights, ids, counts = torch.ops.moe_kernels.router(
        logits,
        top_k,
        bias,
        score_func,
        num_groups,
        topk_groups,
        group_score,
        renormalize,
        float(scaling_factor),
        return_counts,
    )
    return RouterOutput(weights, ids, counts if return_counts else None)


def router_preset(
    logits: torch.Tensor,
    preset: str | RouterPreset,
    *,
    bias: torch.Tensor | None = None,
    return_counts: bool = False,
) -> RouterOutput:
    """``router`` with a model's settings: a RouterPreset or one of PRESETS' names
    ("deepseek_v3", "deepseek_v2", "deepseek_moe_16b", "qwen3_moe", "mixtral", "kimi_k2")."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    check(
        logits.shape[-1] == preset.num_experts,
        "router_preset",
        f"logits must have the preset's {preset.num_experts} experts, got {logits.shape[-1]}",
    )
    return router(logits, preset.top_k, bias=bias, return_counts=return_counts, **preset.router_kwargs())


# ------------------------------------------------------------------------------------------------
# router: CPU path, fake kernel, autograd
# ------------------------------------------------------------------------------------------------


@register_cpu("router")
def _router_cpu(
    logits,
    top_k,
    bias,
    score_func,
    num_groups,
    topk_groups,
    group_score,
    renormalize,
    scaling_factor,
    return_counts,
):
    weights, ids, counts = reference.router(
        logits,
        top_k,
        bias=bias,
        score_func=score_func,
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=group_score,
        renormalize=renormalize,
        scaling_factor=scaling_factor,
    )
    return weights.detach(), ids, counts if return_counts else counts.new_empty(0)


@register_fake("router")
def _router_fake(
    logits,
    top_k,
    bias,
    score_func,
    num_groups,
    topk_groups,
    group_score,
    renormalize,
    scaling_factor,
    return_counts,
):
    reference.check_router_args(
        "router", logits, top_k, bias, score_func, num_groups, topk_groups, group_score
    )
    t, e = logits.shape
    return (
        logits.new_empty((t, top_k), dtype=torch.float32),
        logits.new_empty((t, top_k), dtype=torch.int32),
        logits.new_empty((e if return_counts else 0,), dtype=torch.int32),
    )


@register_cpu("router_backward")
def _router_backward_cpu(grad_weights, logits, ids, score_func, renormalize, scaling_factor):
    with torch.enable_grad():
        lg = logits.detach().requires_grad_(True)
        weights = reference.router_scores(lg, score_func).gather(1, ids.long())
        if renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + reference.RENORM_EPS)
        (grad,) = torch.autograd.grad(weights * scaling_factor, lg, grad_weights)
    return grad.to(logits.dtype)


@register_fake("router_backward")
def _router_backward_fake(grad_weights, logits, ids, score_func, renormalize, scaling_factor):
    return torch.empty_like(logits)


# The router's autograd is registered in C++ (csrc/router/router_autograd.cpp): host time.


# ------------------------------------------------------------------------------------------------
# Balance losses
# ------------------------------------------------------------------------------------------------


def balance_loss(
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
    *,
    score_func: str = "softmax",
    alpha: float = 1.0,
    num_devices: int = 0,
    seq_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Balance loss of DESIGN.md §1 fused in two kernels, differentiable w.r.t. ``logits``.

    Args:
        logits: [T, E] router logits (bf16, fp16, fp32); expert_ids: int32/int64 [T, K], the router's ids.
        score_func: the router's score function ("softmax" or "sigmoid").
        alpha: the loss weight.
        num_devices: 0 for the expert-level loss (DeepSeekMoE), or D > 0 for the device-level loss
            over D equal contiguous groups of experts (DeepSeek-V2).
        seq_offsets: int32 [S + 1] on the device (cu_seqlens: non-decreasing from 0 to T) for the
            sequence-wise loss of DeepSeek-V3 (mean over sequences); None = one sequence.
    Returns:
        fp32 scalar. Same value as ``reference.balance_loss`` (fp32 rounding aside); deterministic.
    """
    loss, _ = torch.ops.moe_kernels.balance_loss(
        logits, expert_ids, seq_offsets, score_func, num_devices, float(alpha)
    )
    return loss


def expert_balance_loss(logits, expert_ids, *, score_func="softmax", alpha=1.0, seq_offsets=None):
    """Expert-level loss alpha * sum_i f_i P_i; with seq_offsets, DeepSeek-V3's sequence-wise variant."""
    return balance_loss(logits, expert_ids, score_func=score_func, alpha=alpha, seq_offsets=seq_offsets)


def device_balance_loss(logits, expert_ids, num_devices, *, score_func="softmax", alpha=1.0):
    """Device-level loss (DeepSeek-V2) over num_devices equal contiguous groups of experts."""
    return balance_loss(logits, expert_ids, score_func=score_func, alpha=alpha, num_devices=num_devices)


def _seq_lens(seq_offsets, num_tokens):
    if seq_offsets is None:
        return [num_tokens]
    offsets = seq_offsets.tolist()
    check(
        offsets[0] == 0 and offsets[-1] == num_tokens and all(a <= b for a, b in itertools.pairwise(offsets)),
        "balance_loss",
        f"seq_offsets must be non-decreasing from 0 to tokens={num_tokens}, got {offsets}",
    )
    return [b - a for a, b in itertools.pairwise(offsets)]


def balance_coefficients(logits, expert_ids, seq_lens, num_devices, alpha):
    """coeff[s, i] = d loss / d n_ti for tokens t of sequence s: alpha * f~_si / (T_s * S)."""
    e, k = logits.shape[1], expert_ids.shape[1]
    group = 1 if num_devices == 0 else e // num_devices
    rows = []
    for ids in expert_ids.split(seq_lens):
        t = ids.shape[0]
        counts = torch.bincount(ids.flatten().long(), minlength=e).double()
        f = e * counts.reshape(-1, group).mean(-1).repeat_interleave(group) / max(k * t, 1)
        rows.append(alpha * f / (max(t, 1) * len(seq_lens)))
    return torch.stack(rows).float()


def _check_balance_ids(logits, expert_ids):
    op = "balance_loss"
    check_dtype(expert_ids, (torch.int32, torch.int64), op, "expert_ids")
    t, e = logits.shape
    check(
        expert_ids.dim() == 2 and expert_ids.shape[0] == t,
        op,
        f"expert_ids must be [tokens={t}, top_k], got shape {list(expert_ids.shape)}",
    )


@register_cpu("balance_loss")
def _balance_loss_cpu(logits, expert_ids, seq_offsets, score_func, num_devices, alpha):
    _check_balance_ids(logits, expert_ids)
    e = logits.shape[1]
    # What the CUDA kernel flags on the device (and does not count), raised at once here.
    check(
        bool(((expert_ids >= 0) & (expert_ids < e)).all()),
        "balance_loss",
        f"expert_ids had values outside [0, num_experts={e})",
    )
    lens = _seq_lens(seq_offsets, logits.shape[0])
    loss = reference.balance_loss(
        logits, expert_ids, score_func=score_func, alpha=alpha, num_devices=num_devices, seq_lens=lens
    )
    return loss.detach().float(), balance_coefficients(logits, expert_ids, lens, num_devices, alpha)


@register_fake("balance_loss")
def _balance_loss_fake(logits, expert_ids, seq_offsets, score_func, num_devices, alpha):
    check_dim(logits, 2, "balance_loss", "logits", "[tokens, experts]")
    _check_balance_ids(logits, expert_ids)
    seqs = 1 if seq_offsets is None else seq_offsets.shape[0] - 1
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(
        (seqs, logits.shape[1]), dtype=torch.float32
    )


@register_cpu("balance_loss_backward")
def _balance_loss_backward_cpu(grad_loss, logits, expert_ids, coeffs, seq_offsets, score_func):
    lens = _seq_lens(seq_offsets, logits.shape[0])
    with torch.enable_grad():
        lg = logits.detach().float().requires_grad_(True)
        scores = reference.router_scores(lg, score_func)
        normalised = scores / (scores.sum(-1, keepdim=True) + reference.RENORM_EPS)
        per_token = coeffs.repeat_interleave(torch.tensor(lens), dim=0)
        (grad,) = torch.autograd.grad((normalised * per_token).sum() * grad_loss, lg)
    return grad.to(logits.dtype)


@register_fake("balance_loss_backward")
def _balance_loss_backward_fake(grad_loss, logits, expert_ids, coeffs, seq_offsets, score_func):
    return torch.empty_like(logits)


def _balance_setup_context(ctx, inputs, output):
    logits, expert_ids, seq_offsets, score_func, _, _ = inputs
    ctx.save_for_backward(logits, expert_ids, output[1], seq_offsets)
    ctx.score_func = score_func
    ctx.mark_non_differentiable(output[1])


def _balance_backward(ctx, grad_loss, grad_coeffs):
    logits, expert_ids, coeffs, seq_offsets = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.moe_kernels.balance_loss_backward(
            grad_loss.float(), logits, expert_ids, coeffs, seq_offsets, ctx.score_func
        )
    return grad_logits, None, None, None, None, None


torch.library.register_autograd(
    "moe_kernels::balance_loss", _balance_backward, setup_context=_balance_setup_context
)


# ------------------------------------------------------------------------------------------------
# Auxiliary-loss-free bias update
# ------------------------------------------------------------------------------------------------


def update_expert_bias_(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """In place: bias_i += rate * sign(mean(counts) - counts_i) (DeepSeek-V3, rate ≈ 1e-3).

    Args:
        bias: fp32 [E], contiguous; counts: int32/int64 [E], exact token counts — summed over the
            data-parallel group first (``all_reduce_counts``) so every rank applies the same update.
    The sign is computed exactly in integers; bit-exact with ``reference.update_expert_bias``.
    """
    torch.ops.moe_kernels.update_expert_bias(bias, counts, float(rate))
    return bias


@register_cpu("update_expert_bias")
def _update_expert_bias_cpu(bias, counts, rate):
    reference.update_expert_bias(bias, counts, rate)


@register_fake("update_expert_bias")
def _update_expert_bias_fake(bias, counts, rate):
    return None
