"""Router selection checks: exact where the choice is clear, tolerant of fp32 near-ties."""

import torch

from moe_kernels.testing.numeric import ROUTER_WEIGHT_ATOL, ROUTER_WEIGHT_RTOL

ROUTER_SEL_TOL = 1e-5


def _check_token_selection(sel, ids, top_k, num_groups, topk_groups, group_score, tol) -> str | None:
    """Why `ids` is not a valid pick from one token's fp32 sel values within tol (None if it is).

    Valid: some choice of kept groups consistent with the group scores up to tol, and within those
    groups K experts whose sel values equal the K largest up to tol."""
    e = sel.shape[0]
    if len(set(ids.tolist())) != top_k or ids.min() < 0 or ids.max() >= e:
        return f"ids {ids.tolist()} not {top_k} distinct experts in [0, {e})"
    sel = torch.where(torch.isnan(sel), torch.full_like(sel, float("-inf")), sel).double()
    if num_groups > 1:
        grouped = sel.view(num_groups, -1)
        gs = (
            grouped.sort(-1, descending=True).values[:, :2].sum(-1)
            if group_score == "top2_sum"
            else grouped.amax(-1)
        )
        gs = torch.where(torch.isnan(gs), torch.full_like(gs, float("-inf")), gs)
        boundary = gs.sort(descending=True).values[topk_groups - 1]
        sure = set((gs > boundary + tol).nonzero().flatten().tolist())
        maybe = set(((gs - boundary).abs() <= tol).nonzero().flatten().tolist()) | set(
            (gs == boundary).nonzero().flatten().tolist()
        )
        picked_groups = set((ids // (e // num_groups)).tolist())
        if not picked_groups <= sure | maybe or len(sure | picked_groups) > topk_groups:
            return f"ids {ids.tolist()} use groups {sorted(picked_groups)}, group scores {gs.tolist()}"
        kept = sure | picked_groups
        for g in sorted(maybe - kept, key=lambda g: grouped[g].max().item()):
            if len(kept) < topk_groups:
                kept.add(g)
        mask = torch.zeros(num_groups, dtype=torch.bool)
        mask[list(kept)] = True
        sel = torch.where(mask.repeat_interleave(e // num_groups), sel, torch.full_like(sel, float("-inf")))
    best = sel.sort(descending=True).values[:top_k]
    got = sel[ids].sort(descending=True).values
    close = (got == best) | ((got - best).abs() <= tol)
    if not bool(close.all()):
        return f"sel at ids {got.tolist()} != top-{top_k} sel {best.tolist()}"
    return None


def assert_router_matches_reference(logits, weights, ids, top_k, *, bias=None, tol=ROUTER_SEL_TOL, **config):
    """Check a router's (weights, ids) against reference.router on the same inputs.

    Rows whose ids equal the reference's exactly pass at once; any other row must be a valid pick
    under fp32 near-ties (see _check_token_selection). Weights are compared with the reference's
    weights recomputed at the kernel's ids, to ROUTER_WEIGHT_RTOL / ROUTER_WEIGHT_ATOL."""
    from moe_kernels import reference

    logits, weights, ids = logits.cpu(), weights.cpu(), ids.cpu().long()
    bias = None if bias is None else bias.cpu()
    _, ref_ids, _ = reference.router(logits, top_k, bias=bias, **config)
    scores = reference.router_scores(logits, config.get("score_func", "softmax"))
    sel = scores if bias is None else scores + bias
    for t in (ids != ref_ids.long()).any(-1).nonzero().flatten().tolist():
        why = _check_token_selection(
            sel[t],
            ids[t],
            top_k,
            config.get("num_groups", 1),
            config.get("topk_groups", 1),
            config.get("group_score", "top2_sum"),
            tol,
        )
        assert why is None, f"token {t}: {why} (reference ids {ref_ids[t].tolist()})"
    expected = scores.gather(1, ids)
    if config.get("renormalize", True):
        expected = expected / (expected.sum(-1, keepdim=True) + reference.RENORM_EPS)
    expected = expected * config.get("scaling_factor", 1.0)
    scale = max(1.0, abs(config.get("scaling_factor", 1.0)))
    torch.testing.assert_close(
        weights, expected, rtol=ROUTER_WEIGHT_RTOL, atol=ROUTER_WEIGHT_ATOL * scale, equal_nan=True
    )
