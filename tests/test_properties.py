"""Property-based tests (hypothesis): random shapes within the documented limits, random loads and
special values, every example checked against moe_kernels.reference (issue 14, part 2).

The ops run on the GPU when a Hopper GPU is present, else their CPU implementations; the profile
("ci": few derandomised examples, "gpu": many) is chosen in conftest.py. On the CPU the CPU path is
the reference itself, so each property also checks invariants that do not come from the reference
(FP8 error bounds, the layout of permute's rows, untouched GEMM rows, round trips).
"""

import itertools

import pytest
import torch
from conftest import _is_sm90
from test_layer import reference_forward

import moe_kernels
from moe_kernels import MoE, RouterPreset, reference
from moe_kernels.testing import (
    BF16_ERROR_FACTOR,
    FP8_GEMM_CALC_DIFF,
    assert_bitwise_equal,
    assert_router_matches_reference,
    calc_diff,
    rel_error,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEVICE = "cuda" if _is_sm90() else "cpu"
FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
seeds = st.integers(0, 2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spread_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 values whose 128-wide groups sit in different binades (2^-10 .. 2^10), so the FP8
    scales differ from group to group; fits fp16 too."""
    x = torch.randn(rows, cols, generator=gen)
    exps = torch.randint(-10, 11, (rows, -(-cols // 128), 1), generator=gen).float()
    return x * torch.exp2(exps).repeat_interleave(128, -1)[..., :cols].reshape(rows, cols)


def inject_specials(x: torch.Tensor, gen: torch.Generator, fraction: float = 0.02) -> torch.Tensor:
    """NaN, +inf and -inf at random places (and, when there is room, one all-zero 128-group)."""
    x = x.clone()
    if x.numel() == 0:
        return x
    pick = torch.rand(x.shape, generator=gen)
    x[pick < fraction] = float("nan")
    x[(pick >= fraction) & (pick < 2 * fraction)] = float("inf")
    x[(pick >= 2 * fraction) & (pick < 3 * fraction)] = float("-inf")
    if x.shape[-1] >= 128:
        x[..., 0, :128] = 0
    return x


# ------------------------------------------------------------------------------------------------
# FP8 quantisation
# ------------------------------------------------------------------------------------------------


def assert_fp8_within_spec(x, q, scales, row_block, pow2_scale, case):
    """Checks from the FP8 spec alone (README "FP8"): scales positive and finite (powers of two with
    pow2_scale), NaN stays NaN, +-inf saturate to +-448, finite values within e4m3 rounding:
    |q * s - x| <= 2^-4 |x| (3 mantissa bits) + 2^-9 s (the subnormal step)."""
    assert bool((scales > 0).all() and torch.isfinite(scales).all()), f"{case}: bad scales"
    if pow2_scale:
        assert bool((scales.view(torch.int32) & 0x007FFFFF == 0).all()), f"{case}: scale not a power of 2"
    xf, qf = x.float(), q.float()
    assert torch.equal(torch.isnan(qf), torch.isnan(xf)), f"{case}: NaN positions"
    assert bool((qf[xf == float("inf")] == 448).all() and (qf[xf == float("-inf")] == -448).all()), case
    full = reference.expand_scales(scales, x.shape) if row_block == 128 else scales.repeat_interleave(128, -1)
    finite = torch.isfinite(xf)
    err = (qf * full - xf).abs()[finite]
    bound = xf.abs()[finite] * (2**-4 + 1e-6) + full[finite] * 2**-9
    assert bool((err <= bound).all()), f"{case}: FP8 rounding error above the e4m3 bound"


@given(
    rows=st.sampled_from([0, 1]) | st.integers(2, 40),
    groups=st.integers(1, 4),
    dtype=st.sampled_from(FLOAT_DTYPES),
    pow2_scale=st.booleans(),
    specials=st.booleans(),
    seed=seeds,
)
def test_quantize_fp8(rows, groups, dtype, pow2_scale, specials, seed):
    gen = generator(seed)
    x = spread_rows(rows, 128 * groups, gen)
    x = (inject_specials(x, gen) if specials else x).to(dtype)
    q, s = moe_kernels.quantize_fp8(x.to(DEVICE), pow2_scale=pow2_scale)
    ref_q, ref_s = reference.quantize_fp8(x, pow2_scale)
    case = f"{rows=} {groups=} {dtype=} {pow2_scale=} {specials=}"
    assert_bitwise_equal(q.cpu(), ref_q, f"{case}: q")
    assert_bitwise_equal(s.cpu(), ref_s, f"{case}: scales")
    assert_fp8_within_spec(x, q.cpu(), s.cpu(), 1, pow2_scale, case)


@given(
    experts=st.none() | st.integers(1, 3),
    n=st.integers(1, 300),
    k_groups=st.integers(1, 3),
    dtype=st.sampled_from(FLOAT_DTYPES),
    pow2_scale=st.booleans(),
    specials=st.booleans(),
    seed=seeds,
)
def test_quantize_fp8_weight_and_dequantize(experts, n, k_groups, dtype, pow2_scale, specials, seed):
    """128x128 weight blocks (N need not be a multiple of 128); dequantize_fp8 of the result too."""
    gen = generator(seed)
    shape = (n, 128 * k_groups) if experts is None else (experts, n, 128 * k_groups)
    w = spread_rows(n * (experts or 1), 128 * k_groups, gen).reshape(shape)
    w = (inject_specials(w, gen) if specials else w).to(dtype)
    q, s = moe_kernels.quantize_fp8_weight(w.to(DEVICE), pow2_scale=pow2_scale)
    ref_q, ref_s = reference.quantize_fp8_weight(w, pow2_scale)
    case = f"{shape=} {dtype=} {pow2_scale=} {specials=}"
    assert_bitwise_equal(q.cpu(), ref_q, f"{case}: q")
    assert_bitwise_equal(s.cpu(), ref_s, f"{case}: scales")
    assert_fp8_within_spec(w, q.cpu(), s.cpu(), 128, pow2_scale, case)
    out_dtype = torch.float32 if specials else torch.bfloat16
    deq = moe_kernels.dequantize_fp8(q, s, out_dtype=out_dtype)
    assert_bitwise_equal(deq.cpu(), reference.dequantize_fp8(ref_q, ref_s, out_dtype), f"{case}: dequantize")


# ------------------------------------------------------------------------------------------------
# Router
# ------------------------------------------------------------------------------------------------


@st.composite
def router_settings(draw):
    """Router arguments within the documented limits (E <= 1024, K <= min(16, E), <= 32 groups)."""
    e = draw(st.sampled_from([2, 3, 8, 16, 24, 60, 64, 128, 160, 256, 384, 1024]))
    num_groups = draw(st.sampled_from([g for g in range(1, min(32, e) + 1) if e % g == 0]))
    group_score = draw(st.sampled_from(["top2_sum", "max"]))
    if num_groups > 1 and e // num_groups < 2:
        group_score = "max"  # top2_sum needs two experts per group
    topk_groups = draw(st.integers(1, num_groups))
    eligible = e if num_groups == 1 else topk_groups * (e // num_groups)
    return dict(
        num_experts=e,
        top_k=draw(st.integers(1, min(16, e, eligible))),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=group_score,
        renormalize=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])),
    )


@given(
    settings=router_settings(),
    tokens=st.sampled_from([0, 1]) | st.integers(2, 48),
    dtype=st.sampled_from(FLOAT_DTYPES),
    with_bias=st.booleans(),
    specials=st.sampled_from(["none", "scattered", "whole_rows", "ties"]),
    seed=seeds,
)
def test_router(settings, tokens, dtype, with_bias, specials, seed):
    gen = generator(seed)
    settings = dict(settings)
    e, top_k = settings.pop("num_experts"), settings.pop("top_k")
    logits = torch.randn(tokens, e, generator=gen) * 3
    if specials == "scattered":
        logits = inject_specials(logits, gen, fraction=0.05)
    elif specials == "whole_rows" and tokens:
        logits[0] = float("nan")
        logits[-1, : e // 2] = float("-inf")
        logits[tokens // 2, e // 3] = float("inf")
    elif specials == "ties" and tokens:
        logits[:, 1::2] = logits[:, ::2][:, : e // 2]  # pairs of equal logits: lower index wins
    logits = logits.to(dtype)
    bias = torch.randn(e, generator=gen) * 0.1 if with_bias else None
    weights, ids, counts = moe_kernels.router(
        logits.to(DEVICE),
        top_k,
        bias=None if bias is None else bias.to(DEVICE),
        return_counts=True,
        **settings,
    )
    ids, counts = ids.cpu(), counts.cpu()
    case = f"{e=} {top_k=} {settings} {tokens=} {dtype=} {with_bias=} {specials=}"
    assert ids.shape == (tokens, top_k) and ids.dtype == torch.int32, case
    assert bool(((ids >= 0) & (ids < e)).all()), f"{case}: ids out of range"
    assert all(len(set(row)) == top_k for row in ids.tolist()), f"{case}: repeated ids"
    # counts are exact integers: those of the ids the kernel picked
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=e).int()), case
    # ids equal the reference's except where fp32 near-ties allow another valid pick; weights to tol
    assert_router_matches_reference(logits, weights, ids, top_k, bias=bias, **settings)
    _, ref_ids, ref_counts = reference.router(logits, top_k, bias=bias, **settings)
    if torch.equal(ids, ref_ids):
        assert torch.equal(counts, ref_counts), case


# ------------------------------------------------------------------------------------------------
# Permute / unpermute
# ------------------------------------------------------------------------------------------------

PERMUTE_MODES = ("bf16", "fp16", "fp32", "quantize", "quantize_pow2", "fp8_in")
LOADS = ("random", "one_expert", "few_experts", "drops")


@st.composite
def routings(draw):
    """(ids [T, K], num_experts, load): K distinct experts per token as a router picks them, with
    empty experts, every token on one expert, or dropped pairs (-1)."""
    tokens = draw(st.sampled_from([0, 1]) | st.integers(2, 80))
    e = draw(st.integers(1, 40))
    top_k = draw(st.integers(1, min(e, 8)))
    load = draw(st.sampled_from(LOADS))
    gen = generator(draw(seeds))
    scores = torch.rand(tokens, e, generator=gen)
    if load == "one_expert":
        scores[:, draw(st.integers(0, e - 1))] = 2.0  # every token's first choice
    elif load == "few_experts":
        used = draw(st.integers(top_k, e))
        scores[:, torch.randperm(e, generator=gen)[used:]] = -1.0  # the others stay empty
    ids = scores.topk(top_k, dim=1).indices
    if load == "drops":
        ids[torch.rand(tokens, top_k, generator=gen) < draw(st.sampled_from([0.1, 0.5, 1.0]))] = -1
    return ids.to(draw(st.sampled_from([torch.int32, torch.int64]))), e, load


@given(
    routing=routings(),
    mode=st.sampled_from(PERMUTE_MODES),
    align=st.sampled_from((1, 16, 64, 128)),
    wide=st.booleans(),
    local=st.booleans(),
    data=st.data(),
)
def test_permute_and_unpermute(routing, mode, align, wide, local, data):
    ids, e, load = routing
    tokens, top_k = ids.shape
    gen = generator(data.draw(seeds))
    fp8_modes = mode.startswith("quantize") or mode == "fp8_in"
    hidden = (256 if wide else 128) if fp8_modes or mode == "fp32" else (256 if wide else 24)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(mode, torch.bfloat16)
    x = inject_specials(spread_rows(tokens, hidden, gen), gen).to(dtype)
    x_scales, kwargs = None, {}
    if mode == "fp8_in":
        x, x_scales = reference.quantize_fp8(x)
    elif fp8_modes:
        kwargs = dict(quantize=True, pow2_scale=mode == "quantize_pow2")
    if local:  # an expert-parallel rank's share of the experts
        kwargs["first_expert"] = data.draw(st.integers(0, e - 1))
        kwargs["num_local_experts"] = data.draw(st.integers(1, e - kwargs["first_expert"]))
    case = f"{tokens=} {e=} {top_k=} {load=} {mode=} {align=} {hidden=} {kwargs}"

    r = moe_kernels.permute(
        x.to(DEVICE),
        ids.to(DEVICE),
        e,
        align=align,
        x_scales=None if x_scales is None else x_scales.to(DEVICE),
        **kwargs,
    )
    out, out_scales, offsets, row_map = reference.permute(x, ids, e, align=align, x_scales=x_scales, **kwargs)
    used = int(offsets[-1])
    assert_bitwise_equal(r.expert_offsets.cpu(), offsets, f"{case}: expert_offsets")
    assert_bitwise_equal(r.row_map.cpu(), row_map, f"{case}: row_map")
    assert r.out.shape == out.shape and r.out.dtype == out.dtype, case
    assert_bitwise_equal(r.out[:used].cpu(), out[:used], f"{case}: rows")
    if out_scales is not None:
        assert_bitwise_equal(r.out_scales[:used].cpu(), out_scales[:used], f"{case}: scales")
    assert_permute_layout(x, x_scales, ids, r, align, kwargs, case)

    # unpermute of random expert outputs, with weights and a shared output, bit-exact
    y_dtype = torch.bfloat16 if fp8_modes else dtype
    y = torch.randn(r.out.shape[0], hidden, generator=gen).to(y_dtype)
    weights = torch.rand(tokens, top_k, generator=gen).to(data.draw(st.sampled_from(FLOAT_DTYPES)))
    shared = torch.randn(tokens, hidden, generator=gen).to(y_dtype) if data.draw(st.booleans()) else None
    got = moe_kernels.unpermute(
        y.to(DEVICE),
        r.row_map,
        weights.to(DEVICE),
        shared_output=None if shared is None else shared.to(DEVICE),
    )
    want = reference.unpermute(y, row_map, weights, shared_output=shared)
    assert_bitwise_equal(got.cpu(), want, f"{case}: unpermute")
    if not fp8_modes:  # the round trip: each token comes back times its number of kept pairs
        back = moe_kernels.unpermute(r.out, r.row_map).cpu()
        kept = (row_map >= 0).sum(1, keepdim=True)
        # a token without kept pairs comes back as 0 (even a NaN one: nothing is read)
        expected = torch.where(kept > 0, x.double() * kept, torch.zeros_like(x, dtype=torch.float64))
        if dtype == torch.float32:
            # n copies summed in fp32 round: the j-th partial sum by at most 2^-24 * j|x|, so in all
            # by less than n * 2^-24 of n|x| (float64's default rtol, 1e-7, failed 7 copies)
            rtol = top_k * 2.0**-24
            torch.testing.assert_close(back.double(), expected, rtol=rtol, atol=0.0, equal_nan=True, msg=case)
        else:  # n <= 8 copies of a 16-bit value add exactly in fp32
            assert_bitwise_equal(back, expected.to(dtype), f"{case}: round trip")


def assert_permute_layout(x, x_scales, ids, r, align, kwargs, case):
    """permute's layout from DESIGN.md §3 alone: each local expert's pairs in pair order, padded to
    `align` with zero rows (FP8: zero bytes, scale 1), every kept pair's row a copy of its token."""
    first = kwargs.get("first_expert", 0)
    num_local = r.expert_offsets.numel() - 1
    offsets, row_map = r.expert_offsets.cpu().long(), r.row_map.cpu().long()
    out = r.out.cpu()
    raw = out.view(torch.uint8) if out.dtype == FP8 else out
    assert offsets[0] == 0 and bool((offsets[1:] >= offsets[:-1]).all()), f"{case}: offsets decrease"
    flat_ids, flat_map = ids.long().flatten(), row_map.flatten()
    for e in range(num_local):
        pairs = (flat_ids == first + e).nonzero().flatten()
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert hi - lo == -(-len(pairs) // align) * align, f"{case}: expert {e} holds {hi - lo} rows"
        assert torch.equal(flat_map[pairs], torch.arange(lo, lo + len(pairs))), f"{case}: expert {e} order"
        assert bool((raw[lo + len(pairs) : hi] == 0).all()), f"{case}: padding rows not zero"
        if r.out_scales is not None:
            assert bool((r.out_scales.cpu()[lo + len(pairs) : hi] == 1).all()), f"{case}: padding scales"
    local = (flat_ids >= first) & (flat_ids < first + num_local)
    assert bool((flat_map[~local] == -1).all()), f"{case}: a pair outside the local experts was kept"
    token_of = torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1])
    kept = flat_map >= 0
    if x.dtype != FP8 and r.out_scales is None:
        assert_bitwise_equal(raw[flat_map[kept]], x[token_of[kept]], f"{case}: copied rows")
    elif x.dtype == FP8:
        assert_bitwise_equal(out[flat_map[kept]], x[token_of[kept]], f"{case}: copied FP8 rows")
        assert_bitwise_equal(r.out_scales.cpu()[flat_map[kept]], x_scales[token_of[kept]], f"{case}: scales")


# ------------------------------------------------------------------------------------------------
# Grouped GEMM
# ------------------------------------------------------------------------------------------------


@st.composite
def expert_rows(draw):
    """Rows per expert (empty experts, one expert with everything, or random), unused head/tail rows."""
    e = draw(st.integers(1, 8))
    shape = draw(st.sampled_from(["random", "one_expert", "all_empty"]))
    if shape == "random":
        counts = draw(st.lists(st.integers(0, 70), min_size=e, max_size=e))
    else:
        counts = [0] * e
        if shape == "one_expert":
            counts[draw(st.integers(0, e - 1))] = draw(st.integers(1, 200))
    return counts, draw(st.integers(0, 5)), draw(st.integers(0, 5))


GEMM_SENTINEL = 7.0  # what `out` holds before the call: rows outside the experts must keep it


@given(
    rows=expert_rows(),
    n=st.sampled_from([128, 256]),
    k=st.sampled_from([128, 256, 384]),
    fp8=st.booleans(),
    data=st.data(),
)
def test_grouped_gemm(rows, n, k, fp8, data):
    counts, head, tail = rows
    gen = generator(data.draw(seeds))
    prefix = "fp8" if fp8 else "bf16"
    config = data.draw(
        st.sampled_from([c for c in moe_kernels.GEMM_CONFIGS if c in ("auto",) or c.startswith(prefix)])
    )
    m, e = head + sum(counts) + tail, len(counts)
    offsets = torch.tensor(list(itertools.accumulate(counts, initial=head)), dtype=torch.int32)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(e, n, k, generator=gen) / k**0.5
    a_s = b_s = None
    if fp8:
        (a, a_s), (b, b_s) = reference.quantize_fp8(a), reference.quantize_fp8_weight(b)
    else:
        a, b = a.bfloat16(), b.bfloat16()
    dev = lambda t: None if t is None else t.to(DEVICE)
    out = torch.full((m, n), GEMM_SENTINEL, dtype=torch.bfloat16, device=DEVICE)
    moe_kernels.grouped_gemm(
        dev(a), dev(b), dev(offsets), a_scales=dev(a_s), b_scales=dev(b_s), out=out, config=config
    )
    out = out.cpu()
    case = f"{counts=} {head=} {tail=} {n=} {k=} {fp8=} {config=}"
    lo, hi = head, head + sum(counts)
    assert bool((out[:lo] == GEMM_SENTINEL).all() and (out[hi:] == GEMM_SENTINEL).all()), (
        f"{case}: rows outside the experts were written"
    )
    if hi == lo:
        return
    ref = reference.grouped_gemm(a, b, offsets, a_scales=a_s, b_scales=b_s, out_dtype=torch.float32)[lo:hi]
    if fp8:
        assert calc_diff(out[lo:hi].float(), ref) < FP8_GEMM_CALC_DIFF, case
        return
    torch_bf16 = torch.cat(
        [a[o0:o1] @ b[i].T for i, (o0, o1) in enumerate(itertools.pairwise(offsets.tolist()))]
    )
    ours, theirs = rel_error(out[lo:hi], ref), rel_error(torch_bf16, ref)
    assert ours <= BF16_ERROR_FACTOR * theirs + 1e-6, f"{case}: error {ours} vs torch bf16 {theirs}"
    # independent of the reference: each expert's block is its own matmul, in float64
    a64 = reference.dequantize_fp8(a, a_s, torch.float64) if fp8 else a.double()
    b64 = reference.dequantize_fp8(b, b_s, torch.float64) if fp8 else b.double()
    for i, (o0, o1) in enumerate(itertools.pairwise(offsets.tolist())):
        if o1 > o0:
            assert rel_error(out[o0:o1], a64[o0:o1] @ b64[i].T) < 1e-2, f"{case}: expert {i}"


# ------------------------------------------------------------------------------------------------
# The MoE layer
# ------------------------------------------------------------------------------------------------


@st.composite
def small_layers(draw):
    """(RouterPreset, hidden, shared width, fp8, hot expert or None) of a small layer."""
    e = draw(st.sampled_from([4, 8, 16]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if e % g == 0 and e // g >= 2]))
    topk_groups = draw(st.integers(1, groups))
    eligible = e if groups == 1 else topk_groups * (e // groups)
    preset = RouterPreset(
        num_experts=e,
        top_k=draw(st.integers(1, min(4, eligible))),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        uses_bias=draw(st.booleans()),
        num_groups=groups,
        topk_groups=topk_groups,
        renormalize=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )
    hot = draw(st.none() | st.integers(0, e - 1))
    return (
        preset,
        draw(st.sampled_from([128, 256])),
        draw(st.sampled_from([0, 128])),
        draw(st.booleans()),
        hot,
    )


@given(layer=small_layers(), tokens=st.sampled_from([0, 1]) | st.integers(2, 40), seed=seeds)
def test_moe_layer(layer, tokens, seed):
    preset, hidden, shared, fp8, hot = layer
    torch.manual_seed(seed)
    moe = MoE(hidden, 128, preset, shared_intermediate_size=shared, device=DEVICE, init_std=0.05).eval()
    gen = generator(seed)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    with torch.no_grad():
        if moe.expert_bias is not None:
            moe.expert_bias.copy_(torch.randn(preset.num_experts, generator=gen) * 0.1)
        if hot is not None:  # positive tokens and a large positive gate row: one expert takes them all
            x = x.abs()
            moe.gate.weight[hot] = moe.gate.weight[hot].abs() + 0.5
        if fp8:
            moe.quantize_()
        out = moe(x.to(DEVICE)).cpu()
        ref = reference_forward(moe.cpu(), x)
    case = f"{preset} {hidden=} {shared=} {fp8=} {hot=} {tokens=}"
    assert out.shape == x.shape and out.dtype == torch.bfloat16, case
    if DEVICE == "cpu":
        assert torch.equal(out, ref), case  # the CPU path chains the references: bit-equal
    elif tokens:
        assert calc_diff(out.float(), ref.float()) < (2e-3 if fp8 else 1e-4), case
