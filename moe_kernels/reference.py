"""Pure-PyTorch references of every moe_kernels op: the executable form of DESIGN.md §2-3.

Tests, benchmarks and the CPU implementations of the ops all use these definitions. They upcast to
fp32, quantise exactly the way the kernels do, and favour obviousness over speed. Where a kernel is
bit-exact with its reference the docstring says so; elsewhere tolerances live in moe_kernels.testing.

Contents
    FP8:            quantize_fp8, quantize_fp8_weight, dequantize_fp8
    Router:         router_scores, router, balance_loss (expert_balance_loss, device_balance_loss,
                    sequence_balance_loss), update_expert_bias
    Data movement:  permute (copy_rows), unpermute, unpermute_backward
    Experts:        grouped_gemm, silu_and_mul, expert_mlp
    Layer:          moe_layer (the MoE module chained from the references above)
    Expert parallel: ep_token_ranks, ep_pack_meta, ep_unpack (the local steps; copy_rows packs);
                    ep_local_ids, ep_dispatch, ep_combine (what every rank must see, all ranks in
                    one process)
"""

import torch
import torch.nn.functional as F

from moe_kernels._checks import (
    FLOAT_DTYPES,
    FP8,
    QUANT_BLOCK,
    check,
    check_dim,
    check_dtype,
    check_quant_channels,
    check_quantize_fp8_args,
    check_quantize_fp8_weight_args,
)

FP8_MAX = 448.0
FLT_MIN = torch.finfo(torch.float32).tiny
RENORM_EPS = 1e-20

# ------------------------------------------------------------------------------------------------
# FP8 quantisation
# ------------------------------------------------------------------------------------------------


def fp8_scale(amax: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """Scale of a quantisation group from the amax of its finite values (fp32).

    amax / 448 correctly rounded; 1 for an all-zero group (no NaN or inf); at least FLT_MIN so
    x * (1 / scale) stays finite; with pow2_scale rounded up to the next power of two.
    """
    amax = amax.float()
    scale = torch.clamp_min(amax / FP8_MAX, FLT_MIN)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    if pow2_scale:
        bits = scale.view(torch.int32)
        mantissa = bits & 0x007FFFFF
        bits = torch.where(mantissa != 0, (bits & ~0x007FFFFF) + 0x00800000, bits)
        scale = bits.view(torch.float32)
    return scale


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    a = x.float().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a))


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 / scale) in fp32 (the reciprocal correctly rounded, then one rounded multiply), rounded
    to e4m3 nearest-even; finite overflow and inf saturate to +-448; NaN stays NaN."""
    inverse = 1.0 / scale
    return (x * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] (bf16/fp16/fp32) -> e4m3 [M, K] and fp32 scales [M, K/128] ("1x128").

    Per group of 128 channels of a row: scale = fp8_scale(amax of the finite |x|), q = x * (1/scale)
    rounded to e4m3 (saturating). NaN stays NaN, +-inf become +-448 (times the group's scale).
    The CUDA kernel is bit-exact with this (NaN bit patterns aside).
    """
    check_quantize_fp8_args(x)
    m, k = x.shape
    groups = x.float().reshape(m, k // QUANT_BLOCK, QUANT_BLOCK)
    scales = fp8_scale(_finite_abs(groups).amax(-1), pow2_scale)
    q = _to_fp8(groups, scales.unsqueeze(-1)).reshape(m, k)
    return q, scales


def quantize_fp8_weight(w: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N, K] or [E, N, K] -> e4m3 of the same shape and fp32 scales per 128x128 block,
    [ceil(N/128), K/128] or [E, ceil(N/128), K/128] (DeepSeek-V3's ``weight_scale_inv`` layout).

    Same scale and rounding rules as quantize_fp8, one scale per block; the last row block may be
    partial. The CUDA kernel is bit-exact with this.
    """
    check_quantize_fp8_weight_args(w)
    e = w.shape[0] if w.dim() == 3 else 1
    w3 = w.float().reshape(e, *w.shape[-2:])
    n, k = w3.shape[1:]
    nb, kb = -(-n // QUANT_BLOCK), k // QUANT_BLOCK
    padded = F.pad(w3, (0, 0, 0, nb * QUANT_BLOCK - n))
    blocks = padded.reshape(e, nb, QUANT_BLOCK, kb, QUANT_BLOCK)
    amax = _finite_abs(blocks).amax(dim=(2, 4)) if blocks.numel() else blocks.new_zeros(e, nb, kb)
    scales = fp8_scale(amax, pow2_scale)
    q = _to_fp8(blocks, scales[:, :, None, :, None]).reshape(e, nb * QUANT_BLOCK, k)[:, :n]
    return q.reshape(w.shape).contiguous(), scales.reshape(*w.shape[:-2], nb, kb)


def expand_scales(scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Blockwise scales ([.., M, K/128] or [.., ceil(N/128), K/128]) broadcast to the full tensor shape."""
    n, k = shape[-2], shape[-1]
    row_block = 1 if scales.shape[-2] == n else QUANT_BLOCK
    full = scales.repeat_interleave(QUANT_BLOCK, dim=-1).repeat_interleave(row_block, dim=-2)
    return full[..., :n, :k]


def dequantize_fp8(
    q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """e4m3 [M, K] or [E, N, K] times its 1x128 or 128x128 scales (told apart by the scales' shape),
    computed in fp32 and rounded to out_dtype. The CUDA kernel is bit-exact with this."""
    op = "dequantize_fp8"
    check_dtype(q, FP8, op, "q")
    check_dtype(scales, torch.float32, op, "scales")
    check(q.dim() in (2, 3), op, f"q must be [rows, K] or [experts, N, K], got shape {list(q.shape)}")
    check(q.shape[-1] % QUANT_BLOCK == 0, op, f"q's last dim must be a multiple of 128, got {q.shape[-1]}")
    n, k = q.shape[-2], q.shape[-1]
    row_block = 1 if scales.dim() == q.dim() and scales.shape[-2] == n else QUANT_BLOCK
    expected = (*q.shape[:-2], -(-n // row_block), k // QUANT_BLOCK)
    check(
        tuple(scales.shape) == expected,
        op,
        f"scales {list(scales.shape)} fit neither 1x128 nor 128x128 blocks of q {list(q.shape)}",
    )
    return (q.float() * expand_scales(scales, q.shape)).to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Router
# ------------------------------------------------------------------------------------------------

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
MAX_EXPERTS = 1024
MAX_TOP_K = 16
MAX_GROUPS = 32


def check_router_args(
    op: str,
    logits: torch.Tensor,
    top_k: int,
    bias,
    score_func: str,
    num_groups: int,
    topk_groups: int,
    group_score: str,
) -> None:
    check_dim(logits, 2, op, "logits", "[tokens, experts]")
    check_dtype(logits, FLOAT_DTYPES, op, "logits")
    e = logits.shape[1]
    check(2 <= e <= MAX_EXPERTS, op, f"the number of experts (logits.shape[1]) must be in [2, 1024], got {e}")
    check(1 <= top_k <= min(MAX_TOP_K, e), op, f"top_k must be in [1, min(16, experts={e})], got {top_k}")
    check(score_func in SCORE_FUNCS, op, f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    check(group_score in GROUP_SCORES, op, f"group_score must be 'top2_sum' or 'max', got {group_score!r}")
    check(
        1 <= num_groups <= MAX_GROUPS and e % num_groups == 0,
        op,
        f"num_groups must be in [1, 32] and divide experts={e}, got {num_groups}",
    )
    check(
        1 <= topk_groups <= num_groups,
        op,
        f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}",
    )
    group_size = e // num_groups
    if num_groups > 1:
        check(
            top_k <= topk_groups * group_size,
            op,
            f"top_k={top_k} exceeds the experts in the kept groups (topk_groups * experts/num_groups = "
            f"{topk_groups * group_size})",
        )
        check(
            group_score != "top2_sum" or group_size >= 2,
            op,
            f"group_score='top2_sum' needs at least 2 experts per group, got {group_size}",
        )
    if bias is not None:
        check_dtype(bias, torch.float32, op, "bias")
        check(tuple(bias.shape) == (e,), op, f"bias must be [experts={e}], got shape {list(bias.shape)}")


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """fp32 scores [T, E]; differentiable. NaN logits count as -inf.

    softmax: exp(l - max) / sum with the row max; when the max is not finite (a +inf logit, or a
    row of -inf/NaN) the scores are uniform over the entries equal to the max. sigmoid: 1/(1+e^-l).
    """
    lg = logits.float()
    lg = torch.where(torch.isnan(lg), torch.full_like(lg, float("-inf")), lg)
    if score_func == "sigmoid":
        return torch.sigmoid(lg)
    row_max = lg.amax(-1, keepdim=True).detach()
    finite = torch.isfinite(row_max)
    e = torch.exp(lg - torch.where(finite, row_max, torch.zeros_like(row_max)))
    e = torch.where(finite, e, (lg == row_max).float())
    return e / e.sum(-1, keepdim=True)


def _nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def _top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last dim; ties to the lower index; NaN as -inf."""
    return torch.sort(_nan_to_neg_inf(x), dim=-1, descending=True, stable=True).indices[..., :k]


def router_select(
    scores: torch.Tensor,
    top_k: int,
    bias=None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
) -> torch.Tensor:
    """Expert ids [T, K] (int64) picked from fp32 scores: the selection half of router()."""
    t, e = scores.shape
    sel = scores.detach() if bias is None else scores.detach() + bias
    sel = _nan_to_neg_inf(sel)
    if num_groups > 1:
        grouped = sel.reshape(t, num_groups, e // num_groups)
        if group_score == "top2_sum":
            group = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        else:
            group = grouped.amax(-1)
        kept = _top_indices(group, topk_groups)
        keep = torch.zeros(t, num_groups, dtype=torch.bool, device=sel.device).scatter_(1, kept, True)
        sel = torch.where(
            keep.repeat_interleave(e // num_groups, dim=1), sel, torch.full_like(sel, float("-inf"))
        )
    return _top_indices(sel, top_k)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DESIGN.md §2. Returns (weights fp32 [T, K], expert ids int32 [T, K], counts int32 [E]).

    1. scores = router_scores(logits) in fp32.   2. sel = scores + bias (selection only).
    3. Groups: E split into num_groups equal groups scored by the sum of their top-2 sel ("top2_sum")
       or their max; all but the best topk_groups are masked to -inf.
    4. ids = the top_k largest sel, ties to the lower index, NaN as -inf (always distinct, in range).
    5. weights = scores at ids (unbiased), optionally / (sum + 1e-20), times scaling_factor.
    The weights are differentiable with respect to the logits (the backward reference).
    """
    check_router_args("router", logits, top_k, bias, score_func, num_groups, topk_groups, group_score)
    scores = router_scores(logits, score_func)
    ids = router_select(scores, top_k, bias, num_groups, topk_groups, group_score)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPS)
    weights = weights * scaling_factor
    counts = torch.bincount(ids.flatten(), minlength=logits.shape[1]).to(torch.int32)
    return weights, ids.to(torch.int32), counts


# ------------------------------------------------------------------------------------------------
# Balance losses and the auxiliary-loss-free bias update (DESIGN.md §1)
# ------------------------------------------------------------------------------------------------


def balance_terms(logits: torch.Tensor, expert_ids: torch.Tensor, score_func: str):
    """(f [E], P [E]) of one batch of tokens.

    f_i = E / (K T) * (number of (token, k) slots routed to expert i)   (no gradient)
    P_i = mean over tokens of the normalised score s_ti / (sum_j s_tj + 1e-20)   (differentiable)
    """
    t, e = logits.shape
    k = expert_ids.shape[1]
    counts = torch.bincount(expert_ids.flatten().long(), minlength=e).float()
    f = counts * (e / max(k * t, 1))
    scores = router_scores(logits, score_func)
    normalised = scores / (scores.sum(-1, keepdim=True) + RENORM_EPS)
    p = normalised.sum(0) / max(t, 1)
    return f, p


def balance_loss(
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
    *,
    score_func: str = "softmax",
    alpha: float = 1.0,
    num_devices: int = 0,
    seq_lens=None,
) -> torch.Tensor:
    """The balance losses of DESIGN.md §1 in one definition (differentiable w.r.t. the logits).

    Per sequence (seq_lens splits the T tokens; default one sequence): with f, P = balance_terms,
    expert-level (num_devices=0) alpha * sum_i f_i P_i; device-level (DeepSeek-V2, experts split
    into num_devices equal contiguous groups d): alpha * sum_d mean_{i in d}(f_i) * sum_{i in d}(P_i).
    The result is the mean over sequences (an empty sequence contributes 0).
    """
    e = logits.shape[1]
    op = "balance_loss"
    check(
        num_devices >= 0 and (num_devices == 0 or e % num_devices == 0),
        op,
        f"num_devices must be 0 (expert-level) or divide experts={e}, got {num_devices}",
    )
    lens = [logits.shape[0]] if seq_lens is None else [int(n) for n in seq_lens]
    check(
        sum(lens) == logits.shape[0] and min(lens, default=0) >= 0 and len(lens) >= 1,
        op,
        f"seq_lens must be non-negative and sum to tokens={logits.shape[0]}, got {lens}",
    )
    group = 1 if num_devices == 0 else e // num_devices
    losses = []
    for lg, ids in zip(logits.split(lens), expert_ids.split(lens), strict=True):
        f, p = balance_terms(lg, ids, score_func)
        f_dev = f.reshape(-1, group).mean(-1)
        p_dev = p.reshape(-1, group).sum(-1)
        losses.append(alpha * (f_dev * p_dev).sum())
    return torch.stack(losses).mean()


def expert_balance_loss(
    logits, expert_ids, *, score_func: str = "softmax", alpha: float = 1.0
) -> torch.Tensor:
    """Expert-level balance loss alpha * sum_i f_i P_i (DeepSeekMoE); 0 for no tokens."""
    return balance_loss(logits, expert_ids, score_func=score_func, alpha=alpha)


def device_balance_loss(
    logits, expert_ids, num_devices: int, *, score_func: str = "softmax", alpha: float = 1.0
) -> torch.Tensor:
    """Device-level balance loss (DeepSeek-V2): experts split into num_devices equal contiguous
    groups d; f'_d = mean of f_i over the group, P'_d = sum of P_i over it; alpha * sum_d f'_d P'_d."""
    return balance_loss(logits, expert_ids, score_func=score_func, alpha=alpha, num_devices=num_devices)


def sequence_balance_loss(
    logits, expert_ids, seq_lens, *, score_func: str = "softmax", alpha: float = 1.0
) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3): the expert-level loss computed per sequence (tokens
    split by seq_lens, which sum to T), averaged over the sequences."""
    return balance_loss(logits, expert_ids, score_func=score_func, alpha=alpha, seq_lens=seq_lens)


def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """In place: bias_i += rate * sign(mean(counts) - counts_i), from exact integer counts.

    The sign is computed exactly as sign(sum(counts) - E * counts_i) in int64; rate is rounded to
    fp32 and the update is one fp32 add. Returns bias.
    """
    op = "update_expert_bias"
    check_dtype(bias, torch.float32, op, "bias")
    check_dtype(counts, (torch.int32, torch.int64), op, "counts")
    check(bias.shape == counts.shape and bias.dim() == 1, op, "bias and counts must both be [experts]")
    c = counts.long()
    direction = torch.sign(c.sum() - c.numel() * c).float()
    return bias.add_(direction * torch.tensor(rate, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# Permute / unpermute (DESIGN.md §3)
# ------------------------------------------------------------------------------------------------

ALIGNMENTS = (1, 16, 64, 128)


def permute_rows_bound(num_pairs: int, num_local_experts: int, align: int) -> int:
    """Rows permute needs at most: every pair plus the worst-case padding of every expert."""
    return num_pairs + num_local_experts * (align - 1)


def permute(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    align: int = 1,
    x_scales: torch.Tensor | None = None,
    quantize: bool = False,
    pow2_scale: bool = False,
    num_out_rows: int | None = None,
    first_expert: int = 0,
    num_local_experts: int | None = None,
):
    """Group the (token, k) pairs' rows by expert. Returns (out, out_scales, expert_offsets, row_map).

    Local experts are [first_expert, first_expert + num_local_experts); other ids (and -1) are
    dropped. Rows are ordered by local expert, then by pair index t*K + k (stable). Each expert's
    segment is padded to a multiple of `align` with zero rows (FP8: zero rows with scale 1).
    out: [R, H] with R = num_out_rows or T*K + E_local*(align-1); rows past expert_offsets[-1] are
    unspecified (zero here). out_scales: [R, H/128] fp32 when FP8 (quantize=True, or x is e4m3 with
    x_scales), else None. expert_offsets: int32 [E_local + 1]. row_map: int32 [T, K], -1 = dropped.
    Bit-exact data movement: the kernel must match this exactly.
    """
    op = "permute"
    check_dim(x, 2, op, "x", "[tokens, hidden]")
    check_dim(expert_ids, 2, op, "expert_ids", "[tokens, top_k]")
    check(
        expert_ids.shape[0] == x.shape[0],
        op,
        f"expert_ids has {expert_ids.shape[0]} rows, x has {x.shape[0]}",
    )
    check(align in ALIGNMENTS, op, f"align must be one of {ALIGNMENTS}, got {align}")
    num_local = num_experts - first_expert if num_local_experts is None else num_local_experts
    check(
        0 <= first_expert and num_local >= 1 and first_expert + num_local <= num_experts,
        op,
        f"local experts [{first_expert}, {first_expert + num_local}) must lie in [0, {num_experts})",
    )
    ids = expert_ids.long()
    check(bool(((ids >= -1) & (ids < num_experts)).all()), op, f"expert_ids must be in [-1, {num_experts})")
    if x.dtype == FP8:
        check(x_scales is not None, op, "x is float8_e4m3fn: pass its 1x128 scales as x_scales")
        check(not quantize, op, "x is already FP8: quantize must be False")
    if quantize:
        check_quant_channels(x.shape[1], op, "x")

    t, k = ids.shape
    dev = x.device
    local = ids - first_expert
    valid = (ids >= 0) & (local >= 0) & (local < num_local)
    counts = torch.bincount(local[valid], minlength=num_local)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_local + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    bound = permute_rows_bound(t * k, num_local, align)
    rows = bound if num_out_rows is None else num_out_rows
    check(
        rows >= int(offsets[-1]),
        op,
        f"num_out_rows={rows} is smaller than the {int(offsets[-1])} rows this routing needs",
    )

    row_map = torch.full((t, k), -1, dtype=torch.int64, device=dev)
    pair_expert = torch.where(valid, local, num_local).flatten()  # dropped pairs sort last
    order = torch.sort(pair_expert, stable=True).indices  # by expert, then pair index
    start = 0
    for e in range(num_local):
        pairs = order[start : start + int(counts[e])]
        row_map.view(-1)[pairs] = offsets[e] + torch.arange(len(pairs), device=dev)
        start += int(counts[e])

    out, out_scales = copy_rows(x, x_scales, row_map, quantize, pow2_scale, rows)
    return out, out_scales, offsets.to(torch.int32), row_map.to(torch.int32)


def copy_rows(x, x_scales, row_map, quantize, pow2_scale, num_out_rows):
    """Row row_map[t, j] of the output = x[t] for every j with row_map[t, j] >= 0: permute's data
    movement, the EP pack and the EP unpack (csrc/permute/copy_rows.h). FP8-quantised 1x128 when
    quantize; an e4m3 x moves with its scales. Returns (out [R, H], out_scales [R, H/128] or None);
    rows no entry names are unspecified (zero, scale 1, here)."""
    fp8 = quantize or x.dtype == FP8
    if quantize:
        x, x_scales = quantize_fp8(x, pow2_scale)
    out = torch.zeros(num_out_rows, x.shape[1], dtype=torch.uint8 if fp8 else x.dtype, device=x.device)
    live = row_map >= 0
    tokens = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(row_map)[live]
    dest = row_map[live].long()
    out[dest] = x.view(torch.uint8)[tokens] if fp8 else x[tokens]
    if not fp8:
        return out, None
    scales = torch.ones(num_out_rows, x.shape[1] // QUANT_BLOCK, dtype=torch.float32, device=x.device)
    scales[dest] = x_scales[tokens]
    return out.view(FP8), scales


def unpermute(
    y: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    shared_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum over k (in k order, fp32) of weights[t, k] * y[row_map[t, k]], then + shared_output[t],
    rounded to y's dtype. Pairs with row_map -1 contribute nothing. Products and sums are separate
    fp32 roundings (no fused multiply-add), so the kernel can match this bit for bit."""
    op = "unpermute"
    check_dim(y, 2, op, "y", "[rows, hidden]")
    check_dim(row_map, 2, op, "row_map", "[tokens, top_k]")
    t, k = row_map.shape
    acc = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):
        if y.shape[0] == 0:  # nothing to gather: every pair must be dropped
            break
        rows = row_map[:, j].long()
        valid = (rows >= 0).unsqueeze(1)
        picked = y[rows.clamp_min(0)].float()
        if weights is not None:
            picked = picked * weights[:, j : j + 1].float()
        acc = acc + torch.where(valid, picked, torch.zeros_like(picked))
    if shared_output is not None:
        acc = acc + shared_output.float()
    return acc.to(y.dtype)


def unpermute_backward(
    grad_out: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None,
    y: torch.Tensor | None,
    num_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of unpermute: (grad_y [num_rows, H] in grad_out's dtype, grad_weights fp32 [T, K]).

    grad_y[row_map[t, k]] = weights[t, k] * grad_out[t] (one fp32 product, rounded), zero on rows no
    pair maps to; grad_weights[t, k] = dot(y[row_map[t, k]], grad_out[t]) in fp32, 0 for dropped
    pairs; an empty [0] tensor when y is None (the weights' gradient is not wanted).
    """
    t, k = row_map.shape
    h = grad_out.shape[1]
    valid = row_map >= 0
    rows = row_map.long()[valid]
    g = grad_out.float().unsqueeze(1).expand(t, k, h)[valid]
    w = weights.float()[valid].unsqueeze(1) if weights is not None else 1.0
    grad_y = torch.zeros(num_rows, h, dtype=grad_out.dtype, device=grad_out.device)
    grad_y[rows] = (g * w).to(grad_out.dtype)
    if y is None:
        return grad_y, torch.empty(0, dtype=torch.float32, device=grad_out.device)
    grad_weights = torch.zeros(t, k, dtype=torch.float32, device=grad_out.device)
    grad_weights[valid] = (y[rows].float() * g).sum(-1)
    return grad_y, grad_weights


# ------------------------------------------------------------------------------------------------
# Grouped GEMM and the expert MLP
# ------------------------------------------------------------------------------------------------


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    a_scales: torch.Tensor | None = None,
    b_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ b[e]^T for each expert e, rows of e = [offsets[e], offsets[e+1]).

    BF16: a [M, K], b [E, N, K]. FP8: a e4m3 [M, K] with 1x128 scales [M, K/128], b e4m3 [E, N, K]
    with 128x128 scales [E, N/128, K/128]; both dequantised to fp32 first (so the reference for an
    FP8 kernel is exact on the same quantised inputs). fp32 accumulation, rounded to out_dtype.
    Rows outside [offsets[0], offsets[-1]) are zero here (the kernel leaves them untouched).
    """
    fp8 = a.dtype == FP8
    af = dequantize_fp8(a, a_scales, torch.float32) if fp8 else a.float()
    bf = dequantize_fp8(b, b_scales, torch.float32) if fp8 else b.float()
    offs = [int(o) for o in expert_offsets]
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for e in range(b.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = af[lo:hi] @ bf[e].T
    return out.to(out_dtype)


def grouped_gemm_dgrad(grad_out: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """grad_a[rows of e] = grad_out[rows of e] @ b[e] (b [E, N, K]): the gradient of grouped_gemm's a.
    fp32 accumulation, bf16 out; rows outside the experts are zero."""
    offs = [int(o) for o in expert_offsets]
    out = torch.zeros(grad_out.shape[0], b.shape[2], dtype=torch.float32, device=grad_out.device)
    for e in range(b.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = grad_out[lo:hi].float() @ b[e].float()
    return out.to(torch.bfloat16)


def grouped_gemm_wgrad(
    grad_out: torch.Tensor,
    a: torch.Tensor,
    expert_offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """grad_b[e] = grad_out[rows of e]^T @ a[rows of e] -> [E, N, K]: the gradient of grouped_gemm's b.
    fp32 accumulation; an expert without rows gets zeros."""
    offs = [int(o) for o in expert_offsets]
    num_experts = len(offs) - 1
    out = torch.zeros(num_experts, grad_out.shape[1], a.shape[1], dtype=torch.float32, device=a.device)
    for e in range(num_experts):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[e] = grad_out[lo:hi].float().T @ a[lo:hi].float()
    return out.to(out_dtype)


def padded_offsets(expert_offsets: torch.Tensor) -> torch.Tensor:
    """Offsets of each expert's rows rounded up to 128 rows, from 0 (quantize_fp8_transposed)."""
    rows = (expert_offsets[1:] - expert_offsets[:-1]).long()
    tiles = (rows + QUANT_BLOCK - 1) // QUANT_BLOCK
    return F.pad(torch.cumsum(tiles, 0) * QUANT_BLOCK, (1, 0)).to(torch.int32)


def transposed_capacity(rows: int, num_experts: int) -> int:
    """Rows of quantize_fp8_transposed's padded layout: up to 127 rows of padding per expert."""
    return (rows // QUANT_BLOCK + num_experts) * QUANT_BLOCK


def quantize_fp8_transposed(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    x_scales: torch.Tensor | None = None,
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert's rows x[offsets[e] : offsets[e+1]] ([R, C]) transposed, padded with zero rows to
    R_pad (a multiple of 128) and quantised with one scale per channel and 128 rows (DeepSeek-V3's
    128x1 tiles for the wgrad). Returns flat (q e4m3 [capacity * C] holding expert e's [C, R_pad]
    block at C * padded[e], scales fp32 [capacity / 128 * C] holding its [R_pad / 128, C] block at
    C * padded[e] / 128, padded offsets int32 [E + 1]); the tail past padded[E] is unspecified (zero
    here). e4m3 x is dequantised with its 1x128 x_scales first."""
    xf = dequantize_fp8(x, x_scales, torch.float32) if x.dtype == FP8 else x.float()
    channels, num_experts = x.shape[1], expert_offsets.shape[0] - 1
    padded = padded_offsets(expert_offsets)
    capacity = transposed_capacity(x.shape[0], num_experts)
    q = torch.zeros(capacity * channels, dtype=FP8, device=x.device)
    scales = torch.zeros(capacity // QUANT_BLOCK * channels, dtype=torch.float32, device=x.device)
    offs, pads = expert_offsets.tolist(), padded.tolist()
    for e in range(num_experts):
        lo, hi, first, last = offs[e], offs[e + 1], pads[e], pads[e + 1]
        if last == first:
            continue
        block = torch.zeros(channels, last - first, dtype=torch.float32, device=x.device)
        block[:, : hi - lo] = xf[lo:hi].T
        bq, bs = quantize_fp8(block, pow2_scale)
        q[channels * first : channels * last] = bq.reshape(-1)
        scales[channels * first // QUANT_BLOCK : channels * last // QUANT_BLOCK] = bs.T.reshape(-1)
    return q, scales, padded


def grouped_gemm_wgrad_fp8(
    grad_t: torch.Tensor,
    grad_t_scales: torch.Tensor,
    act_t: torch.Tensor,
    act_t_scales: torch.Tensor,
    padded: torch.Tensor,
    n: int,
    k: int,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The FP8 wgrad on quantize_fp8_transposed's operands: out[e] = G_e @ A_e^T [n, k], with G_e
    [n, R_pad_e] and A_e [k, R_pad_e] each expert's dequantised blocks (fp32 accumulation)."""
    pads = padded.tolist()
    num_experts = len(pads) - 1
    out = torch.zeros(num_experts, n, k, dtype=torch.float32, device=grad_t.device)
    for e in range(num_experts):
        first, last = pads[e], pads[e + 1]
        if last == first:
            continue
        blocks = []
        for q, s, width in ((grad_t, grad_t_scales, n), (act_t, act_t_scales, k)):
            bq = q[width * first : width * last].view(width, last - first)
            bs = s[width * first // QUANT_BLOCK : width * last // QUANT_BLOCK].view(-1, width).T
            blocks.append(dequantize_fp8(bq, bs.contiguous(), torch.float32))
        out[e] = blocks[0] @ blocks[1].T
    return out.to(out_dtype)


def silu_mul_backward(grad_act: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h fp32 [M, 2I], act fp32 [M, I]): the gradient of SiLU(gate) * up for h = [gate | up],
    d/dgate = grad * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate), d/dup = grad * SiLU(gate)."""
    gate, up = h.float().chunk(2, dim=-1)
    dy = grad_act.float()
    s = torch.sigmoid(gate)
    silu = gate * s
    return torch.cat([dy * up * s * (1 + gate * (1 - s)), dy * silu], dim=-1), silu * up


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a gate_up output [M, 2I] (first I gate, next I up) -> fp32 [M, I]."""
    gate, up = h.float().chunk(2, dim=-1)
    return F.silu(gate) * up


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
    """The DeepSeekMoE expert MLP on permuted rows: down(SiLU(gate) * up) with gate_up [E, 2I, H]
    and down [E, H, I] (transformers 5.x layout). FP8 when x is e4m3: the gate_up output is rounded
    to bf16, activated in fp32 and re-quantised 1x128 before the down GEMM. Returns bf16 [M, H]."""
    h = grouped_gemm(x, w_gate_up, expert_offsets, a_scales=x_scales, b_scales=w_gate_up_scales)
    act = silu_and_mul(h)
    if x.dtype == FP8:
        act_q, act_scales = quantize_fp8(act, pow2_scale)
        return grouped_gemm(act_q, w_down, expert_offsets, a_scales=act_scales, b_scales=w_down_scales)
    return grouped_gemm(act.to(torch.bfloat16), w_down, expert_offsets)


def moe_layer(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    w_gate_up_scales: torch.Tensor | None = None,
    w_down_scales: torch.Tensor | None = None,
    shared_output: torch.Tensor | None = None,
    logits_fp32: bool = True,
    weights_dtype: torch.dtype | None = None,
    **router_kwargs,
) -> torch.Tensor:
    """The DeepSeekMoE layer (``moe_kernels.MoE``) chained from these references, x bf16 [T, H] ->
    bf16 [T, H]: gate logits x @ gate_weight^T (in fp32, or in x's dtype), router (router_kwargs:
    bias, score_func, groups, renormalize, scaling_factor), routing weights optionally rounded to
    weights_dtype, permute (quantised 1x128 when the weights are FP8), expert_mlp, and unpermute
    with the shared experts' output added."""
    logits = F.linear(x.float(), gate_weight.float()) if logits_fp32 else F.linear(x, gate_weight.to(x.dtype))
    weights, ids, _ = router(logits, top_k, **router_kwargs)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    fp8 = w_gate_up.dtype == FP8
    rows, row_scales, offsets, row_map = permute(x, ids, w_gate_up.shape[0], quantize=fp8)
    y = expert_mlp(
        rows,
        offsets,
        w_gate_up,
        w_down,
        x_scales=row_scales,
        w_gate_up_scales=w_gate_up_scales,
        w_down_scales=w_down_scales,
    )
    return unpermute(y, row_map, weights, shared_output=shared_output)


# ------------------------------------------------------------------------------------------------
# Expert parallel (../shared/ep-design.md §3): the local steps on either side of the exchange, and
# the global results every rank must see (all ranks' tokens in one process)
# ------------------------------------------------------------------------------------------------


def ep_token_ranks(expert_ids: torch.Tensor, expert_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Each token's distinct destination ranks, ascending, padded with -1: int32 [T, K].

    expert_rank: int32 [E], the rank that holds each expert. Ids of -1 are dropped; ids outside
    [-1, E) raise here (the kernel drops them and sets the device-error flag)."""
    op = "ep_token_ranks"
    check_dim(expert_ids, 2, op, "expert_ids", "[tokens, top_k]")
    e = expert_rank.numel()
    ids = expert_ids.long()
    check(bool(((ids >= -1) & (ids < e)).all()), op, f"expert_ids must be in [-1, {e})")
    ranks = torch.where(ids >= 0, expert_rank.long()[ids.clamp_min(0)], num_ranks).sort(dim=1).values
    repeat = torch.zeros_like(ranks, dtype=torch.bool)
    repeat[:, 1:] = ranks[:, 1:] == ranks[:, :-1]
    ranks = torch.where(repeat, num_ranks, ranks).sort(dim=1).values
    return torch.where(ranks == num_ranks, -1, ranks).to(torch.int32)


def ep_pack_meta(
    expert_ids: torch.Tensor,
    weights: torch.Tensor | None,
    expert_rank: torch.Tensor,
    expert_local: torch.Tensor,
    expert_row_map: torch.Tensor,
    expert_offsets: torch.Tensor,
    rank_ids: torch.Tensor,
    send_row_map: torch.Tensor,
    rank_offsets: torch.Tensor,
    rank_experts: torch.Tensor,
    capacity: int,
    num_send_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What travels beside the send block. Returns (meta, pair_slot, send_counts, send_rows).

    send_row_map / rank_offsets: permute's map and offsets over the ranks (the packed block);
    capacity > 0 moves rank r's rows to r * capacity + (row - rank_offsets[r]) instead (fixed
    sizes; a slot past the capacity is dropped). send_rows: int32 [T, K], the resulting row of each
    (token, rank_ids[t, j]), -1 where none.

    meta: int32 [num_send_rows, 3, K]: for send row s (token t bound for rank r, at
        send_row_map[t, j] where rank_ids[t, j] = r), the token's pairs whose expert lives on r, in
        k order: [0] the expert's index among r's experts (-1 past the last entry), [1] eidx (the
        pair's index among this source's pairs of that expert: expert_row_map - expert_offsets),
        [2] the gate weight as fp32 bits (1.0 when weights is None).
    pair_slot: int32 [T, K], s * K + entry of each pair, -1 when dropped.
    send_counts: int32 [W, 1 + L]: rows sent to rank r, then this source's pairs of each of r's
        experts (rank_experts [W, L]: r's experts ascending, -1 padded).
    """
    t, k = expert_ids.shape
    dev = expert_ids.device
    send_rows = send_row_map.long()
    if capacity:
        ranks = rank_ids.long()
        slot = send_rows - rank_offsets.long()[ranks.clamp_min(0)]
        check(
            bool((slot[ranks >= 0] < capacity).all()),
            "ep_pack_meta",
            f"a rank gets more than capacity={capacity} rows",
        )
        send_rows = torch.where(ranks >= 0, ranks * capacity + slot, -1)
    ids = expert_ids.long()
    valid = ids >= 0
    e = ids.clamp_min(0)
    rank = torch.where(valid, expert_rank.long()[e], -1)
    earlier = torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)  # [k, k'] k' < k
    same = (rank[:, :, None] == rank[:, None, :]) & valid[:, None, :] & earlier
    entry = same.sum(-1)
    column = (rank_ids.long()[:, None, :] == rank[:, :, None]).int().argmax(-1)
    row = send_rows.gather(1, column)
    live = valid & (row >= 0) & (row < num_send_rows)
    w = torch.ones(t, k, device=dev) if weights is None else weights.float()
    meta = torch.zeros(num_send_rows, 3, k, dtype=torch.int32, device=dev)
    meta[:, 0] = -1
    rows, entries = row[live], entry[live]
    meta[rows, 0, entries] = expert_local.long()[e][live].to(torch.int32)
    eidx = expert_row_map.long() - expert_offsets.long()[e]
    meta[rows, 1, entries] = eidx[live].to(torch.int32)
    meta[rows, 2, entries] = w[live].contiguous().view(torch.int32)
    pair_slot = torch.where(live, row * k + entry, -1).to(torch.int32)
    expert_counts = expert_offsets.long().diff()
    experts = rank_experts.long()
    per_expert = torch.where(experts >= 0, expert_counts[experts.clamp_min(0)], 0)
    send_counts = torch.cat([rank_offsets.long().diff()[:, None], per_expert], 1).to(torch.int32)
    return meta, pair_slot, send_counts, send_rows.to(torch.int32)


def ep_unpack(
    recv_x: torch.Tensor,
    recv_scales: torch.Tensor | None,
    recv_meta: torch.Tensor,
    recv_counts: torch.Tensor,
    num_local_experts: int,
    source_capacity: int,
    align: int,
    num_out_rows: int,
):
    """The rows every source sent, laid out expert-major. Returns (out, out_scales, expert_offsets,
    row_map, weights).

    recv_counts: int32 [W, 1 + L], row s what source s sent (rows, then pairs per local expert).
    Source s's rows start at s * source_capacity, or right after source s-1's when it is 0.
    Expert l's rows are [offsets[l], offsets[l] + count), padded to `align` with zero rows (FP8:
    zero bytes, scale 1); inside it rows come by (source, eidx). row_map / weights [rows, K]: the
    output row and gate weight of each meta entry (-1 / 0 when none): what combine needs.
    """
    op = "ep_unpack"
    w_src = recv_counts.shape[0]
    dev = recv_x.device
    rows_from = recv_counts[:, 0].long()
    counts = recv_counts[:, 1 : 1 + num_local_experts].long()  # [W, L]
    padded = (counts.sum(0) + align - 1) // align * align
    offsets = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=dev)
    offsets[1:] = padded.cumsum(0)
    check(
        int(offsets[-1]) <= num_out_rows,
        op,
        f"num_out_rows={num_out_rows} is smaller than the {int(offsets[-1])} rows received",
    )
    base = offsets[:-1][None, :] + counts.cumsum(0) - counts  # [W, L]
    if source_capacity:
        start = torch.arange(w_src + 1, device=dev) * source_capacity
    else:
        start = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), rows_from.cumsum(0)])
    j = torch.arange(recv_x.shape[0], device=dev)
    source = (torch.searchsorted(start[1:w_src], j, right=True)).clamp_max(w_src - 1)
    live = (j - start[source]) < rows_from[source]
    local, eidx = recv_meta[:, 0].long(), recv_meta[:, 1].long()
    entry = live[:, None] & (local >= 0)
    check(
        bool((local[entry] < num_local_experts).all()),
        op,
        "recv_meta names an expert this rank does not hold",
    )
    lc = local.clamp(0, num_local_experts - 1)
    in_range = (eidx >= 0) & (eidx < counts[source[:, None], lc])
    check(bool(in_range[entry].all()), op, "recv_meta's eidx exceed the counts received")
    row_map = torch.where(entry, base[source[:, None], lc] + eidx, -1)
    weights = torch.where(entry, recv_meta[:, 2].contiguous().view(torch.float32), 0.0)

    out, out_scales = copy_rows(recv_x, recv_scales, row_map, False, False, num_out_rows)
    return out, out_scales, offsets.to(torch.int32), row_map.to(torch.int32), weights


def ep_local_ids(expert_ids: torch.Tensor, expert_rank: torch.Tensor, rank: int) -> torch.Tensor:
    """Each id as an index among `rank`'s experts (ascending global order), -1 when elsewhere."""
    mine = expert_rank.long() == rank
    local = mine.long().cumsum(0) - 1
    ids = expert_ids.long()
    keep = (ids >= 0) & mine[ids.clamp_min(0)]
    return torch.where(keep, local[ids.clamp_min(0)], -1)


def ep_dispatch(
    xs: list[torch.Tensor],
    expert_ids: list[torch.Tensor],
    expert_rank: torch.Tensor,
    rank: int,
    *,
    align: int = 1,
    quantize: bool = False,
    pow2_scale: bool = False,
    x_scales: list[torch.Tensor] | None = None,
):
    """What `rank` must receive from a dispatch of every rank's tokens (xs[r], expert_ids[r]):
    permute of the rank-ordered concatenation, keeping `rank`'s experts. Returns permute's
    (out, out_scales, expert_offsets, row_map); row_map is over the concatenated tokens."""
    num_local = int((expert_rank == rank).sum())
    local = ep_local_ids(torch.cat(expert_ids), expert_rank, rank)
    scales = None if x_scales is None else torch.cat(x_scales)
    return permute(
        torch.cat(xs),
        local,
        num_local,
        align=align,
        quantize=quantize,
        pow2_scale=pow2_scale,
        x_scales=scales,
    )


def ep_combine(
    ys: list[torch.Tensor],
    expert_ids: list[torch.Tensor],
    weights: list[torch.Tensor] | None,
    expert_rank: torch.Tensor,
    *,
    align: int = 1,
    shared_outputs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """What each source rank must get back from a combine. ys[r]: rank r's expert outputs, laid out
    as ep_dispatch(..., rank=r, align=align) gave them.

    Rank r first reduces each token's rows on r: the sum in k order of w * row in fp32, rounded to
    y's dtype (one row per (token, rank) crosses back). The source then adds those partial sums in
    rank order in fp32, over the ranks the token was sent to, plus its shared output, and rounds
    once: deterministic, and what the kernels give bit for bit."""
    ids = torch.cat(expert_ids)
    w = None if weights is None else torch.cat(weights)
    acc = torch.zeros(ids.shape[0], ys[0].shape[1], dtype=torch.float32, device=ys[0].device)
    for r, y in enumerate(ys):
        local = ep_local_ids(ids, expert_rank, r)
        num_local = int((expert_rank == r).sum())
        row_map = permute(y.new_empty(ids.shape[0], 0), local, num_local, align=align)[3]
        partial = unpermute(y, row_map, w)
        sent = (local >= 0).any(1)
        acc[sent] = acc[sent] + partial[sent].float()
    if shared_outputs is not None:
        acc = acc + torch.cat(shared_outputs).float()
    return list(acc.to(ys[0].dtype).split([len(i) for i in expert_ids]))
