"""moe_kernels.reference against plain-loop restatements of DESIGN.md §1-3, on the CPU.

The helpers at the top redo every op one token, one k, one expert or one 128-group at a time, in Python
floats / float64 with each fp32 rounding written out (f32), so that each can be checked by reading it.
The references must match them bit for bit where the contract says so (FP8 quantisation, data movement,
unpermute's fp32 sums, the bias update, counts) and up to fp32 / bf16 rounding elsewhere. FP8 follows
reference.py's docstrings: q = x * fp32(1 / scale), one rounded multiply, then e4m3 nearest-even.
"""

import math
import re
import struct
from fractions import Fraction

import pytest
import torch

from moe_kernels import reference
from moe_kernels.presets import PRESETS

FP8 = torch.float8_e4m3fn
FLT_MIN = 2.0**-126
INF, NAN = math.inf, math.nan
NEAR_TIE = 1e-6  # fp64 sel values this close (but not equal) may legitimately order differently in fp32
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROUTER_DEFAULTS = dict(
    score_func="softmax",
    num_groups=1,
    topk_groups=1,
    group_score="top2_sum",
    renormalize=True,
    scaling_factor=1.0,
)

# ------------------------------------------------------------------------------------------------
# Loop helpers: numbers and FP8
# ------------------------------------------------------------------------------------------------


def f32(v):
    """v rounded to the nearest fp32 (ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


def fp8_byte(v):
    """e4m3fn byte of a float with |v| <= 448, rounded to nearest, ties to even (0x7F for NaN)."""
    if math.isnan(v):
        return 0x7F
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    step = 2.0**-9 if a < 2.0**-6 else 2.0 ** (math.frexp(a)[1] - 4)  # spacing of e4m3 values near a
    a = round(a / step) * step  # Python's round() is exact and ties to even
    if a < 2.0**-6:
        return sign | int(a / 2.0**-9)  # subnormal: exponent field 0
    m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
    return sign | (e + 6) << 3 | (int(m * 16) - 8)


def fp8_value(byte):
    """Value of an e4m3fn byte (0x7F and 0xFF are NaN)."""
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return NAN
    magnitude = mantissa * 2.0**-9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return -magnitude if byte & 0x80 else magnitude


FP8_VALUES = torch.tensor([fp8_value(b) for b in range(256)], dtype=torch.float64)


def group_scale(vals, pow2):
    """fp32 scale of one group: amax/448 of its finite |v| (1 if amax is 0), >= FLT_MIN, pow2 rounds up."""
    amax = max((abs(v) for v in vals if math.isfinite(v)), default=0.0)
    scale = 1.0 if amax == 0 else max(f32(amax / 448.0), FLT_MIN)
    if pow2 and math.frexp(scale)[0] != 0.5:
        scale = 2.0 ** math.frexp(scale)[1]
    return scale


def quantize_group(vals, scale):
    """e4m3 bytes of each v * fp32(1 / scale) (one fp32 multiply), clamped to +-448; NaN stays NaN."""
    inverse, out = f32(1.0 / scale), []
    for v in vals:
        q = f32(v * inverse)
        out.append(fp8_byte(q if math.isnan(q) else min(max(q, -448.0), 448.0)))
    return out


def loop_quantize_fp8(x, pow2):
    """1x128 quantisation, one row and one 128-group at a time: (bytes uint8 [M, K], scales [M, K/128])."""
    m, k = x.shape
    q, s = [], []
    for row in x.float().tolist():
        for g in range(0, k, 128):
            s.append(group_scale(row[g : g + 128], pow2))
            q += quantize_group(row[g : g + 128], s[-1])
    return torch.tensor(q, dtype=torch.uint8).reshape(m, k), torch.tensor(s, dtype=torch.float32).reshape(
        m, k // 128
    )


def loop_quantize_fp8_weight(w, pow2):
    """128x128 quantisation of [N, K] or [E, N, K], one (expert, row block, column block) at a time."""
    n, k = w.shape[-2:]
    w3 = w.float().reshape(math.prod(w.shape[:-2]), n, k)
    nb, kb = -(-n // 128), k // 128
    q = torch.zeros(w3.shape, dtype=torch.uint8)
    s = torch.zeros(w3.shape[0], nb, kb, dtype=torch.float32)
    for e in range(w3.shape[0]):
        for i in range(nb):
            for j in range(kb):
                block = w3[e, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                vals = block.flatten().tolist()
                s[e, i, j] = scale = group_scale(vals, pow2)
                q[e, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = torch.tensor(
                    quantize_group(vals, scale), dtype=torch.uint8
                ).reshape(block.shape)
    return q.reshape(w.shape), s.reshape(*w.shape[:-2], nb, kb)


def loop_dequantize(q, scales, block_rows):
    """Exact float64 value of each e4m3 element (or byte) times the scale of its (block_rows x 128) block."""
    n, k = q.shape[-2:]
    vals = FP8_VALUES[q.view(torch.uint8).long()].reshape(math.prod(q.shape[:-2]), n, k)
    s = scales.reshape(vals.shape[0], scales.shape[-2], k // 128)
    for e in range(vals.shape[0]):
        for r in range(n):
            for g in range(k // 128):
                vals[e, r, g * 128 : (g + 1) * 128] *= s[e, r // block_rows, g].item()
    return vals.reshape(q.shape)


# ------------------------------------------------------------------------------------------------
# Loop helpers: router and balance losses
# ------------------------------------------------------------------------------------------------


def sigmoid(v):
    """1 / (1 + e^-v) in float64 without overflow."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    z = math.exp(v)
    return z / (1.0 + z)


def loop_scores(row, score_func):
    """float64 scores of one token (NaN = -inf; softmax is uniform over the entries at a non-finite max)."""
    lg = [-INF if math.isnan(v) else v for v in row]
    if score_func == "sigmoid":
        return [sigmoid(v) for v in lg]
    top = max(lg)
    ex = [math.exp(v - top) for v in lg] if math.isfinite(top) else [float(v == top) for v in lg]
    total = math.fsum(ex)
    return [v / total for v in ex]


def is_near_tie(descending, n):
    """Whether the n-th and (n+1)-th of these descending values differ, but by at most NEAR_TIE."""
    return n < len(descending) and 0 < descending[n - 1] - descending[n] <= NEAR_TIE


def loop_select(sel, top_k, num_groups=1, topk_groups=1, group_score="top2_sum"):
    """(top_k largest sel within the best topk_groups groups, ties to the lower index; near-tie flag)."""
    size = len(sel) // num_groups
    candidates, near = range(len(sel)), False
    if num_groups > 1:
        scores = []
        for g in range(num_groups):
            members = sorted(sel[g * size : (g + 1) * size], reverse=True)
            scores.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
        ranked = sorted(range(num_groups), key=lambda g: (-scores[g], g))
        near = is_near_tie([scores[g] for g in ranked], topk_groups)
        candidates = [i for g in ranked[:topk_groups] for i in range(g * size, (g + 1) * size)]
    ranked = sorted(candidates, key=lambda i: (-sel[i], i))
    return ranked[:top_k], near or is_near_tie([sel[i] for i in ranked], top_k)


def loop_router_weights(logits, ids, score_func, renormalize, scaling_factor):
    """Differentiable float64 router weights at fixed ids, one token and one k at a time."""
    rows = []
    for t in range(logits.shape[0]):
        lg = logits[t]
        if score_func == "softmax":
            ex = [torch.exp(lg[j] - lg.max().detach()) for j in range(len(lg))]
            s = [v / sum(ex) for v in ex]
        else:
            s = [1 / (1 + torch.exp(-lg[j])) for j in range(len(lg))]
        w = [s[i] for i in ids[t]]
        if renormalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        rows.append(torch.stack(w) * scaling_factor)
    return torch.stack(rows)


def loop_f_p(logits, ids, score_func):
    """(f, P): f_i = E/(K*T) * count_i (integer counting loop), P_i = mean_t s_ti / (sum_j s_tj + 1e-20)."""
    t, e = logits.shape
    counts = [0] * e
    for row in ids.tolist():
        for i in row:
            counts[i] += 1
    f = [e * c / (ids.shape[1] * t) if t else 0.0 for c in counts]
    p = [0.0] * e
    for row in logits.double().tolist():
        s = loop_scores(row, score_func)
        total = math.fsum(s) + 1e-20
        for i in range(e):
            p[i] += s[i] / total / t
    return f, p


def loop_expert_loss(logits, ids, score_func, alpha):
    """alpha * sum_i f_i P_i."""
    f, p = loop_f_p(logits, ids, score_func)
    return alpha * math.fsum(a * b for a, b in zip(f, p, strict=True))


def loop_device_loss(logits, ids, num_devices, score_func, alpha):
    """alpha * sum_d mean(f over device d's contiguous experts) * sum(P over them)."""
    f, p = loop_f_p(logits, ids, score_func)
    n = len(f) // num_devices
    terms = [
        math.fsum(f[d * n : (d + 1) * n]) / n * math.fsum(p[d * n : (d + 1) * n]) for d in range(num_devices)
    ]
    return alpha * math.fsum(terms)


def loop_balance_loss(logits, ids, score_func, alpha, num_devices=0, seq_lens=None):
    """Mean over the sequences (default one) of each one's expert-level (num_devices=0) or device loss."""
    losses, start = [], 0
    for n in [logits.shape[0]] if seq_lens is None else seq_lens:
        lg, i = logits[start : start + n], ids[start : start + n]
        if num_devices == 0:
            losses.append(loop_expert_loss(lg, i, score_func, alpha))
        else:
            losses.append(loop_device_loss(lg, i, num_devices, score_func, alpha))
        start += n
    return math.fsum(losses) / len(losses)


def loop_update_bias(bias, counts, rate):
    """b_i + fp32(rate) * sign(mean(c) - c_i) as one fp32 add, with mean(c) an exact fraction."""
    mean = Fraction(sum(counts), len(counts))
    r = f32(rate)
    return [f32(b + r * ((mean > c) - (mean < c))) for b, c in zip(bias, counts, strict=True)]


# ------------------------------------------------------------------------------------------------
# Loop helpers: data movement and experts
# ------------------------------------------------------------------------------------------------


def loop_permute(ids, top_k, first, num_local, align):
    """(source token of each row, None for padding; offsets; row_map): expert by expert, then pair t*K+k."""
    sources, offsets = [], [0]
    row_map = [[-1] * top_k for _ in ids]
    for expert in range(first, first + num_local):
        for t, row in enumerate(ids):
            for k, i in enumerate(row):
                if i == expert:
                    row_map[t][k] = len(sources)
                    sources.append(t)
        while (len(sources) - offsets[-1]) % align:
            sources.append(None)
        offsets.append(len(sources))
    return sources, offsets, row_map


def gather_rows(sources, rows, pad):
    """Tensor of rows[t] for each source token t, and of `pad` for each padding row (None)."""
    return torch.stack([pad if t is None else rows[t] for t in sources]) if sources else rows[:0]


def loop_unpermute(y, row_map, weights, shared):
    """Per token: fp32 sum over k in order of w * y[row] (separate roundings), + shared, in y's dtype."""
    out = torch.zeros(row_map.shape[0], y.shape[1], dtype=y.dtype)
    for t, rows in enumerate(row_map.tolist()):
        acc = torch.zeros(y.shape[1], dtype=torch.float32)
        for k, r in enumerate(rows):
            if r < 0:
                continue
            term = y[r].float() if weights is None else y[r].float() * weights[t, k].float()
            acc = acc + term
        if shared is not None:
            acc = acc + shared[t].float()
        out[t] = acc.to(y.dtype)
    return out


def loop_grouped_gemm(a, b, offsets):
    """float64 [M, N]: rows [offsets[e], offsets[e+1]) times b[e]^T one expert at a time, zero elsewhere."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for e in range(b.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        out[lo:hi] = a[lo:hi].double() @ b[e].double().T
    return out


def loop_silu_and_mul(h):
    """float64 [M, I]: silu(gate) * up element by element, gate = first half of the row, up = second."""
    half = h.shape[1] // 2
    rows = [[r[i] * sigmoid(r[i]) * r[half + i] for i in range(half)] for r in h.double().tolist()]
    return torch.tensor(rows, dtype=torch.float64).reshape(h.shape[0], half)


def loop_expert_mlp(x64, offsets, gate_up64, down64, fp8, pow2):
    """float64 down(silu(gate) * up): gate_up output rounded to bf16; the activation to bf16, or FP8 1x128."""
    h = loop_grouped_gemm(x64, gate_up64, offsets).to(torch.bfloat16)
    act = loop_silu_and_mul(h).float()
    if fp8:
        act64 = loop_dequantize(*loop_quantize_fp8(act, pow2), block_rows=1)
    else:
        act64 = act.to(torch.bfloat16).double()
    return loop_grouped_gemm(act64, down64, offsets)


# ------------------------------------------------------------------------------------------------
# Inputs and comparisons
# ------------------------------------------------------------------------------------------------


def bits(t):
    """Raw bytes of a tensor, for bit-exact comparisons."""
    return t.contiguous().view(torch.uint8)


def assert_fp8_bytes(q, expected, msg):
    """e4m3 q equals the expected bytes bit for bit; NaNs compared by position only."""
    assert q.dtype == FP8 and q.shape == expected.shape, f"{msg}: {q.dtype} {tuple(q.shape)}"
    got, nan = q.view(torch.uint8), (expected & 0x7F) == 0x7F
    assert torch.equal(torch.isnan(q.float()), nan), f"{msg}: NaN positions differ"
    bad = ((got != expected) & ~nan).nonzero().tolist()
    assert not bad, (
        f"{msg}: {len(bad)} bytes differ, first {bad[0]}: {got[tuple(bad[0])]} != {expected[tuple(bad[0])]}"
    )


def assert_same_bits(got, expected, msg):
    """Same dtype, shape and raw bytes; NaNs compared by position only."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (
        f"{msg}: {got.dtype} {tuple(got.shape)}"
    )
    nan = torch.isnan(expected.float())
    assert torch.equal(torch.isnan(got.float()), nan), f"{msg}: NaN positions differ"
    got, expected = got.masked_fill(nan, 0), expected.masked_fill(nan, 0)
    bad = (bits(got) != bits(expected)).nonzero().tolist()
    assert not bad, f"{msg}: {len(bad)} bytes differ, first at byte {bad[0]}"


def assert_rel_close(out, expected, tol, msg):
    """||out - expected|| / ||expected|| < tol (exact zeros when expected is all zero)."""
    norm = expected.norm().item()
    if norm == 0:
        assert not out.any(), f"{msg}: expected all zeros"
        return
    err = (out.double() - expected).norm().item() / norm
    assert err < tol, f"{msg}: relative error {err:.3g} >= {tol}"


def make_activations(m, k, dtype, gen):
    """128-groups over many binades, cycling: normal, NaN, +inf, 0s, no finite, tiny, huge, -inf+NaN."""
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    expo = torch.randint(-12, 12, (m, k // 128), generator=gen).tolist()
    tiny, huge = (2.0**-20, 2.0**13) if dtype == torch.float16 else (2.0**-128, 2.0**110)
    for r in range(m):
        for g in range(k // 128):
            grp = x[r, g * 128 : (g + 1) * 128]
            grp *= 2.0 ** expo[r][g]
            kind = (r + g) % 8
            if kind == 1:
                grp[r % 128] = NAN
            elif kind == 2:
                grp[3] = INF
            elif kind == 3:
                grp.zero_()
            elif kind == 4:
                grp.fill_(INF)
                grp[::3], grp[1::3] = -INF, NAN
            elif kind in (5, 6):
                grp *= (tiny if kind == 5 else huge) * 2.0 ** -expo[r][g]
            elif kind == 7:
                grp[70], grp[71] = -INF, NAN
    return x.to(dtype)


def make_weights(shape, dtype, gen):
    """Weights with per-expert magnitudes, NaN and +-inf entries, an all-zero block and a non-finite block."""
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    n, k = shape[-2:]
    w3 = w.view(math.prod(shape[:-2]), n, k)
    for e in range(w3.shape[0]):
        w3[e] *= 2.0 ** (3 * e - 2)
    if n:
        w3[0, 0, 5], w3[0, n // 2, 7], w3[-1, n - 1, 9] = NAN, INF, -INF
    if n > 128:
        w3[0, 128:, :128] = 0
        if k >= 256:
            w3[0, 128:, 128:256] = INF
            w3[0, 128:, 131] = NAN
    elif k >= 256:
        w3[0, :, 128:256] = 0
    return w.to(dtype)


def make_ids(t, k, e, gen, drop=0.15, skip=()):
    """int32 [t, k]: distinct expert ids per token from [0, e) minus `skip`, about `drop` of them -1."""
    allowed = torch.tensor([i for i in range(e) if i not in skip])
    ids = torch.zeros(t, k, dtype=torch.long)
    for row in range(t):
        ids[row] = allowed[torch.randperm(len(allowed), generator=gen)[:k]]
    ids[torch.rand(t, k, generator=gen) < drop] = -1
    return ids.to(torch.int32)


# ------------------------------------------------------------------------------------------------
# FP8 quantisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [0, 1, 2, 7])
def test_quantize_fp8(m, dtype, pow2, gen):
    x = make_activations(m, 1024, dtype, gen)
    q, s = reference.quantize_fp8(x, pow2)
    expected_q, expected_s = loop_quantize_fp8(x, pow2)
    msg = f"{m=} {dtype=} {pow2=}"
    assert_fp8_bytes(q, expected_q, msg)
    assert s.dtype == torch.float32 and torch.equal(s, expected_s), f"{msg}: scales {s} != {expected_s}"


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (127, 256), (130, 256), (2, 130, 128), (2, 1, 256)])
def test_quantize_fp8_weight(shape, dtype, pow2, gen):
    w = make_weights(shape, dtype, gen)
    q, s = reference.quantize_fp8_weight(w, pow2)
    expected_q, expected_s = loop_quantize_fp8_weight(w, pow2)
    msg = f"{shape=} {dtype=} {pow2=}"
    assert_fp8_bytes(q, expected_q, msg)
    assert s.dtype == torch.float32 and torch.equal(s, expected_s), f"{msg}: scales {s} != {expected_s}"


@pytest.mark.parametrize("shape", [(0, 256), (2, 0, 128), (0, 3, 128)])
def test_quantize_fp8_weight_empty(shape):
    # Like quantize_fp8 with M=0: no rows (or no experts) gives empty e4m3 and empty scales.
    w = torch.zeros(shape)
    q, s = reference.quantize_fp8_weight(w)
    expected_q, expected_s = loop_quantize_fp8_weight(w, False)
    assert_fp8_bytes(q, expected_q, f"{shape=}")
    assert s.shape == expected_s.shape, (
        f"{shape=}: scales shape {tuple(s.shape)} != {tuple(expected_s.shape)}"
    )


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "q_shape,s_shape,block_rows",
    [
        ((5, 384), (5, 3), 1),
        ((0, 256), (0, 2), 1),
        ((130, 256), (2, 2), 128),
        ((2, 200, 128), (2, 2, 1), 128),
        ((2, 3, 256), (2, 3, 2), 1),
        ((100, 256), (1, 2), 128),
    ],
)
def test_dequantize_fp8(q_shape, s_shape, block_rows, out_dtype, gen):
    # Every e4m3 byte (NaN patterns included), scales spanning binades.
    q = torch.randint(0, 256, q_shape, generator=gen).to(torch.uint8)
    q.view(-1)[: min(256, q.numel())] = torch.arange(min(256, q.numel())).to(torch.uint8)
    s = (torch.rand(s_shape, generator=gen) + 0.5) * torch.exp2(
        torch.randint(-20, 20, s_shape, generator=gen)
    )
    out = reference.dequantize_fp8(q.view(FP8), s, out_dtype)
    expected = loop_dequantize(q, s, block_rows).float().to(out_dtype)
    assert_same_bits(out, expected, f"{q_shape=} {s_shape=} {out_dtype=}")


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: reference.quantize_fp8(torch.ones(2, 100)),
            "quantize_fp8: x's channels must be a multiple of 128",
        ),
        (
            lambda: reference.quantize_fp8(torch.ones(0, 200)),
            "quantize_fp8: x's channels must be a multiple of 128",
        ),
        (lambda: reference.quantize_fp8_weight(torch.ones(128, 200)), "quantize_fp8_weight: w's last dim K"),
        (lambda: reference.quantize_fp8_weight(torch.ones(2, 3, 64)), "quantize_fp8_weight: w's last dim K"),
        (
            lambda: reference.dequantize_fp8(torch.ones(2, 100).to(FP8), torch.ones(2, 1)),
            "dequantize_fp8: q's last",
        ),
        (lambda: reference.dequantize_fp8(torch.ones(2, 256).to(FP8), torch.ones(2, 3)), "fit neither"),
    ],
    ids=["x_K100", "x_M0_K200", "w_K200", "w3d_K64", "q_K100", "scales_shape"],
)
def test_fp8_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ------------------------------------------------------------------------------------------------
# Router
# ------------------------------------------------------------------------------------------------


def check_router(logits, top_k, msg, bias=None, **kwargs):
    """Run reference.router and compare its ids, weights and counts with the loop, token by token."""
    cfg = ROUTER_DEFAULTS | kwargs
    weights, ids, counts = reference.router(logits, top_k, bias=bias, **cfg)
    t, e = logits.shape
    assert weights.dtype == torch.float32 and weights.shape == (t, top_k), f"{msg}: weights {weights.shape}"
    assert ids.dtype == torch.int32 and ids.shape == (t, top_k), f"{msg}: ids {ids.dtype} {ids.shape}"
    assert counts.dtype == torch.int32 and counts.shape == (e,), (
        f"{msg}: counts {counts.dtype} {counts.shape}"
    )
    b = [0.0] * e if bias is None else bias.tolist()
    expected_w, expected_counts = [], [0] * e
    for tok, (row, got) in enumerate(zip(logits.double().tolist(), ids.tolist(), strict=True)):
        scores = loop_scores(row, cfg["score_func"])
        sel = [s + bb for s, bb in zip(scores, b, strict=True)]
        mine, near = loop_select(sel, top_k, cfg["num_groups"], cfg["topk_groups"], cfg["group_score"])
        where = f"{msg} token={tok}"
        assert len(set(got)) == top_k and all(0 <= i < e for i in got), (
            f"{where}: ids {got} not distinct/in range"
        )
        if sorted(got) != sorted(mine):
            got_v, mine_v = sorted(sel[i] for i in got), sorted(sel[i] for i in mine)
            close = all(abs(a - c) <= NEAR_TIE for a, c in zip(got_v, mine_v, strict=True))
            assert near and close, (
                f"{where}: ids {sorted(got)} != loop {sorted(mine)} (sel {got_v} vs {mine_v})"
            )
        w = [scores[i] for i in got]
        if cfg["renormalize"]:
            w = [v / (math.fsum(w) + 1e-20) for v in w]
        expected_w.append([v * cfg["scaling_factor"] for v in w])
        for i in got:
            expected_counts[i] += 1
    expected = torch.tensor(expected_w, dtype=torch.float64).reshape(t, top_k)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{msg}: {m}")
    assert counts.tolist() == expected_counts, f"{msg}: counts {counts.tolist()} != {expected_counts}"
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("name", list(PRESETS))
def test_router_presets(name, T, dtype, gen):
    p = PRESETS[name]
    logits = (torch.randn(T, p.num_experts, generator=gen) * 2).to(dtype)
    bias = torch.randn(p.num_experts, generator=gen) * 0.05 if p.uses_bias else None
    check_router(logits, p.top_k, f"{name} {T=} {dtype=}", bias=bias, **p.router_kwargs())


ROUTER_CONFIGS = {
    "E2_K1": dict(E=2, K=1),
    "E2_K2_sigmoid_bias": dict(E=2, K=2, score_func="sigmoid", bias=True),
    "E60_K1_no_renorm": dict(E=60, K=1, renormalize=False),
    "E60_K16_sigmoid": dict(E=60, K=16, score_func="sigmoid", renormalize=False, scaling_factor=3.0),
    "E60_G30_pairs_top2": dict(E=60, K=10, num_groups=30, topk_groups=5, bias=True),
    "E60_G5_softmax_bias": dict(E=60, K=6, num_groups=5, topk_groups=2, bias=True, scaling_factor=2.0),
    "E72_G8_max": dict(E=72, K=8, num_groups=8, topk_groups=3, group_score="max", renormalize=False),
    "E72_G4_top2_sigmoid": dict(E=72, K=16, num_groups=4, topk_groups=2, score_func="sigmoid", bias=True),
    "E144_G12_keep1_max": dict(
        E=144, K=12, num_groups=12, topk_groups=1, group_score="max", score_func="sigmoid"
    ),
    "E144_G16_keep_all": dict(E=144, K=9, num_groups=16, topk_groups=16, bias=True),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_router_configs(name, T, dtype, gen):
    cfg = dict(ROUTER_CONFIGS[name])
    e, k, with_bias = cfg.pop("E"), cfg.pop("K"), cfg.pop("bias", False)
    logits = (torch.randn(T, e, generator=gen) * 2).to(dtype)
    bias = torch.randn(e, generator=gen) * 0.05 if with_bias else None
    check_router(logits, k, f"{name} {T=} {dtype=}", bias=bias, **cfg)


@pytest.mark.parametrize("E,K", [(e, k) for e in (2, 5, 8) for k in range(1, e + 1)])
def test_router_every_top_k(E, K, gen):
    for score_func in ("softmax", "sigmoid"):
        logits = torch.randn(33, E, generator=gen) * 2
        bias = torch.randn(E, generator=gen) * 0.05 if score_func == "sigmoid" else None
        check_router(logits, K, f"{E=} {K=} {score_func=}", bias=bias, score_func=score_func)


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_router_integer_logits_exact_ties(group_score, gen):
    # Small integer logits: many exact ties among experts and among groups, all resolved to the lower index.
    logits = torch.randint(-3, 3, (33, 16), generator=gen).float()
    check_router(logits, 5, f"{group_score=}", num_groups=4, topk_groups=2, group_score=group_score)
    check_router(logits, 3, f"{group_score=} no groups")


TIE_CASES = {
    # name: (logits rows, top_k, router kwargs, expected id set per row)
    "duplicate_logits": ([[1, 3, 3, 2, 3, 0]], 2, {}, [{1, 2}]),
    "tied_groups_top2": ([[0, 1, 1, 0, 0, 1, 1, 0]], 3, dict(num_groups=4, topk_groups=2), [{0, 1, 2}]),
    "tied_groups_max": (
        [[0, 1, 1, 0, 0, 1, 1, 0]],
        3,
        dict(num_groups=4, topk_groups=2, group_score="max"),
        [{0, 1, 2}],
    ),
    "nan_is_minus_inf": ([[NAN, 1, 2, 0], [5, NAN, NAN, 1]], 1, {}, [{2}, {0}]),
    "nan_is_minus_inf_sigmoid": (
        [[NAN, 1, 2, 0], [NAN, -9, -8, NAN]],
        2,
        dict(score_func="sigmoid"),
        [{1, 2}, {1, 2}],
    ),
    "all_minus_inf": ([[-INF] * 5, [NAN] * 5], 2, {}, [{0, 1}, {0, 1}]),
    "all_minus_inf_sigmoid": ([[-INF] * 5, [NAN] * 5], 3, dict(score_func="sigmoid"), [{0, 1, 2}, {0, 1, 2}]),
    "plus_inf": ([[0, INF, 1, INF], [NAN, -INF, INF, 5]], 3, {}, [{0, 1, 3}, {0, 1, 2}]),
    "plus_inf_sigmoid": ([[0, INF, 1, INF]], 3, dict(score_func="sigmoid"), [{1, 2, 3}]),
    # Every kept sel is negative: masking dropped groups to 0 (not -inf) would pick from them.
    "masked_groups_are_minus_inf_not_0": (
        [[0] * 8, [1, 0, 0, 0, 0, 0, 0, 1]],
        2,
        dict(num_groups=4, topk_groups=1, bias=torch.tensor([-1.0, -1.0] + [-2.0] * 6)),
        [{0, 1}, {0, 1}],
    ),
    "k_equals_e": ([[3, 1, 2], [NAN, INF, -INF]], 3, dict(renormalize=False), [{0, 1, 2}, {0, 1, 2}]),
    "groups_with_nan_and_inf": (
        [[NAN, 0, 1, INF, -INF, 2, NAN, NAN]],
        3,
        dict(num_groups=4, topk_groups=2),
        [{0, 1, 3}],
    ),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(TIE_CASES))
def test_router_ties_and_special_values(name, dtype):
    rows, k, kwargs, expected = TIE_CASES[name]
    ids = check_router(torch.tensor(rows, dtype=torch.float64).to(dtype), k, f"{name} {dtype=}", **kwargs)
    assert [set(r) for r in ids.tolist()] == expected, f"{name} {dtype=}: ids {ids.tolist()} != {expected}"


def test_router_bias_selects_but_does_not_weigh():
    # All-equal scores: the bias alone decides; the weights stay the unbiased scores.
    logits = torch.full((2, 4), -INF)
    bias = torch.tensor([0.0, 0.1, 0.3, 0.2])
    ids = check_router(logits, 2, "bias on -inf rows", bias=bias, score_func="sigmoid")
    assert [set(r) for r in ids.tolist()] == [{2, 3}] * 2, f"bias on -inf rows: {ids.tolist()}"
    ids = check_router(torch.zeros(1, 4), 1, "bias on zeros", bias=bias, renormalize=False)
    assert ids.tolist() == [[2]], f"bias on zeros: {ids.tolist()}"


ROUTER_ERRORS = {
    "E_not_divisible_by_groups": (
        (4, 10),
        2,
        dict(num_groups=3),
        "num_groups must be in [1, 32] and divide experts=10",
    ),
    "top_k_above_E": ((4, 6), 7, {}, "top_k must be in [1, min(16, experts=6)], got 7"),
    "top_k_above_16": ((4, 32), 17, {}, "top_k must be in [1, min(16, experts=32)], got 17"),
    "top_k_zero": ((4, 6), 0, {}, "top_k must be in"),
    "topk_groups_above_groups": (
        (4, 8),
        2,
        dict(num_groups=4, topk_groups=5),
        "topk_groups must be in [1, num_groups=4]",
    ),
    "bad_score_func": (
        (4, 8),
        2,
        dict(score_func="relu"),
        "score_func must be 'softmax' or 'sigmoid', got 'relu'",
    ),
    "bad_group_score": (
        (4, 8),
        2,
        dict(num_groups=2, group_score="mean"),
        "group_score must be 'top2_sum' or 'max'",
    ),
    "top_k_beyond_kept_groups": ((4, 8), 5, dict(num_groups=4, topk_groups=2), "top_k=5 exceeds the experts"),
    "top2_sum_one_per_group": (
        (4, 8),
        2,
        dict(num_groups=8, topk_groups=4),
        "group_score='top2_sum' needs at least 2 experts per group, got 1",
    ),
    "one_expert": ((4, 1), 1, {}, "the number of experts (logits.shape[1]) must be in [2, 1024]"),
    "bias_shape": ((4, 8), 2, dict(bias=torch.zeros(7)), "bias must be [experts=8]"),
    "bias_dtype": ((4, 8), 2, dict(bias=torch.zeros(8, dtype=torch.float64)), "bias must be float32"),
    "logits_1d": ((8,), 2, {}, "logits must be 2-D"),
    "logits_int": ((4, 8), 2, dict(dtype=torch.int32), "logits must be bfloat16 or float16 or float32"),
}


@pytest.mark.parametrize("name", list(ROUTER_ERRORS))
def test_router_errors(name):
    shape, k, kwargs, message = ROUTER_ERRORS[name]
    kwargs = dict(kwargs)
    logits = torch.zeros(shape, dtype=kwargs.pop("dtype", torch.float32))
    with pytest.raises(ValueError, match=re.escape(f"router: {message}")):
        reference.router(logits, k, **kwargs)


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_backward(score_func, renormalize, groups, gen):
    t, e, k = 3, 8, 3
    kwargs = dict(score_func=score_func, renormalize=renormalize, scaling_factor=2.5)
    if groups:
        kwargs |= dict(num_groups=4, topk_groups=2)
    bias = torch.randn(e, generator=gen) * 0.01 if groups else None
    # Well-separated logits (gaps >= 0.3), so perturbations of 1e-3 never change the selection.
    logits = torch.stack([torch.randperm(e, generator=gen) for _ in range(t)]).double() * 0.6 - 2.0
    logits += torch.rand(t, e, generator=gen, dtype=torch.float64) * 0.3
    msg = f"{score_func=} {renormalize=} {groups=}"
    ids = check_router(logits.float(), k, msg, bias=bias, **kwargs)
    cfg = ROUTER_DEFAULTS | kwargs

    def loop_fn(lg):
        return loop_router_weights(lg, ids.tolist(), score_func, cfg["renormalize"], cfg["scaling_factor"])

    def ref_fn(lg):
        w, got, _ = reference.router(lg.float(), k, bias=bias, **kwargs)
        assert torch.equal(got, ids), f"{msg}: selection moved under a small perturbation"
        return w.double()

    assert torch.autograd.gradcheck(loop_fn, (logits.clone().requires_grad_(),)), msg
    assert torch.autograd.gradcheck(
        ref_fn, (logits.clone().requires_grad_(),), eps=1e-3, atol=1e-3, rtol=1e-2
    ), msg
    jac_ref = torch.autograd.functional.jacobian(
        lambda lg: reference.router(lg, k, bias=bias, **kwargs)[0], logits.float()
    )
    jac_loop = torch.autograd.functional.jacobian(loop_fn, logits)
    assert jac_loop.abs().sum() > 0, msg
    torch.testing.assert_close(jac_ref.double(), jac_loop, rtol=1e-4, atol=1e-6, msg=lambda m: f"{msg}: {m}")


# ------------------------------------------------------------------------------------------------
# Balance losses and the expert-bias update
# ------------------------------------------------------------------------------------------------

LOSS_CASES = [  # (E, K, T, score_func, logits dtype, alpha)
    (8, 2, 13, "softmax", torch.float32, 1.0),
    (8, 2, 1, "sigmoid", torch.float32, 0.01),
    (60, 6, 33, "sigmoid", torch.bfloat16, 0.3),
    (64, 6, 20, "softmax", torch.float32, 1e-3),
    (8, 2, 0, "softmax", torch.float32, 1.0),
]


def loss_inputs(e, k, t, dtype, gen):
    """(logits [t, e], distinct expert ids [t, k] with no drops)."""
    return (torch.randn(t, e, generator=gen) * 2).to(dtype), make_ids(t, k, e, gen, drop=0.0)


def assert_loss(got, expected, msg):
    """A scalar loss equals the loop's value up to fp32 rounding."""
    assert got.dim() == 0 and math.isclose(got.item(), expected, rel_tol=1e-5, abs_tol=1e-7), (
        f"{msg}: {got.item()} != loop {expected}"
    )


@pytest.mark.parametrize("E,K,T,score_func,dtype,alpha", LOSS_CASES)
def test_expert_balance_loss(E, K, T, score_func, dtype, alpha, gen):
    logits, ids = loss_inputs(E, K, T, dtype, gen)
    got = reference.expert_balance_loss(logits, ids, score_func=score_func, alpha=alpha)
    assert_loss(got, loop_expert_loss(logits, ids, score_func, alpha), f"{E=} {K=} {T=} {score_func=}")
    if T == 0:
        assert got.item() == 0.0, f"{E=} {K=} {T=}: no tokens must give 0, got {got.item()}"


@pytest.mark.parametrize("num_devices", [1, 2, 4])
@pytest.mark.parametrize("E,K,T,score_func,dtype,alpha", LOSS_CASES)
def test_device_balance_loss(E, K, T, score_func, dtype, alpha, num_devices, gen):
    logits, ids = loss_inputs(E, K, T, dtype, gen)
    got = reference.device_balance_loss(logits, ids, num_devices, score_func=score_func, alpha=alpha)
    expected = loop_device_loss(logits, ids, num_devices, score_func, alpha)
    assert_loss(got, expected, f"{E=} {K=} {T=} {score_func=} {num_devices=}")


@pytest.mark.parametrize(
    "seq_lens", [[13], [5, 0, 8], [1] * 13, [12, 1]], ids=["one", "with_empty", "singletons", "uneven"]
)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_balance_loss(seq_lens, score_func, gen):
    logits, ids = loss_inputs(16, 3, sum(seq_lens), torch.float32, gen)
    got = reference.sequence_balance_loss(logits, ids, seq_lens, score_func=score_func, alpha=0.5)
    expected = loop_balance_loss(logits, ids, score_func, 0.5, seq_lens=seq_lens)
    assert_loss(got, expected, f"{seq_lens=} {score_func=}")


@pytest.mark.parametrize(
    "seq_lens", [None, [13], [5, 0, 8], [12, 1]], ids=["default", "one", "with_empty", "uneven"]
)
@pytest.mark.parametrize("num_devices", [0, 2, 4])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_balance_loss(score_func, num_devices, seq_lens, gen):
    logits, ids = loss_inputs(16, 3, 13, torch.bfloat16, gen)
    got = reference.balance_loss(
        logits, ids, score_func=score_func, alpha=0.7, num_devices=num_devices, seq_lens=seq_lens
    )
    expected = loop_balance_loss(logits, ids, score_func, 0.7, num_devices, seq_lens)
    assert_loss(got, expected, f"{score_func=} {num_devices=} {seq_lens=}")


@pytest.mark.parametrize("seq_lens", [[0], [0, 0]])
def test_sequence_balance_loss_no_tokens(seq_lens):
    got = reference.sequence_balance_loss(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.int32), seq_lens)
    assert got.dim() == 0 and got.item() == 0.0, f"{seq_lens=}: {got}"


def test_balance_loss_errors():
    logits, ids = torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_devices must .*divide experts=8"):
        reference.device_balance_loss(logits, ids, 3)
    with pytest.raises(ValueError, match="num_devices must .*divide experts=8"):
        reference.balance_loss(logits, ids, num_devices=3)
    with pytest.raises(ValueError, match="seq_lens must be non-negative and sum to tokens=4"):
        reference.balance_loss(logits, ids, seq_lens=[5, -1])
    with pytest.raises(ValueError, match="seq_lens must be non-negative and sum to tokens=4"):
        reference.sequence_balance_loss(logits, ids, [1, 2])


BIAS_CASES = {
    # name: (counts, counts dtype, rate, bias magnitude)
    "random": (None, torch.int32, 1e-3, 0.1),
    "all_equal": ([7] * 8, torch.int32, 1e-3, 0.1),
    "mean_equals_a_count": ([1, 2, 3], torch.int64, 0.5, 0.1),
    "one_expert": ([5], torch.int32, 1e-3, 0.1),
    "int32_sum_overflows": ([2**31 - 1, 2**31 - 1, 2**31 - 2], torch.int32, 1e-3, 0.1),
    "int64_fractional_mean": ([2**40, 2**40 + 1, 2**40 + 1], torch.int64, 1e-3, 0.1),
    "big_bias_rounds": (None, torch.int64, 1e-3, 1e4),
}


@pytest.mark.parametrize("name", list(BIAS_CASES))
def test_update_expert_bias(name, gen):
    counts, dtype, rate, magnitude = BIAS_CASES[name]
    counts = torch.randint(0, 50, (16,), generator=gen).tolist() if counts is None else counts
    bias = torch.randn(len(counts), generator=gen) * magnitude
    before = bias.tolist()
    result = reference.update_expert_bias(bias, torch.tensor(counts, dtype=dtype), rate)
    assert result is bias and bias.dtype == torch.float32, f"{name}: must update bias in place and return it"
    expected = loop_update_bias(before, counts, rate)
    assert bias.tolist() == expected, f"{name}: {bias.tolist()} != {expected}"
    if name == "all_equal":
        assert bias.tolist() == before, f"{name}: equal counts must leave the bias alone"


# ------------------------------------------------------------------------------------------------
# Permute / unpermute
# ------------------------------------------------------------------------------------------------


def check_permute(result, ids, rows, scales, first, num_local, align, num_rows, msg):
    """reference.permute's result vs the loop layout; rows/scales: each token's expected row (FP8: bytes)."""
    out, out_scales, offsets, row_map = result
    sources, expected_offsets, expected_map = loop_permute(
        ids.tolist(), ids.shape[1], first, num_local, align
    )
    n = expected_offsets[-1]
    assert offsets.dtype == torch.int32 and offsets.tolist() == expected_offsets, (
        f"{msg}: offsets {offsets.tolist()} != {expected_offsets}"
    )
    assert row_map.dtype == torch.int32 and row_map.tolist() == expected_map, (
        f"{msg}: row_map {row_map.tolist()} != {expected_map}"
    )
    assert tuple(out.shape) == (num_rows, rows.shape[1]), f"{msg}: out shape {tuple(out.shape)}"
    expected = gather_rows(sources, rows, torch.zeros(rows.shape[1], dtype=rows.dtype))
    assert torch.equal(bits(out[:n]), bits(expected)), f"{msg}: permuted rows differ"
    assert not bits(out[n:]).any(), f"{msg}: rows past expert_offsets[-1] are not zero"
    if scales is None:
        assert out.dtype == rows.dtype and out_scales is None, f"{msg}: {out.dtype} {type(out_scales)}"
        return
    assert out.dtype == FP8 and out_scales.dtype == torch.float32, f"{msg}: {out.dtype} {out_scales.dtype}"
    assert tuple(out_scales.shape) == (num_rows, rows.shape[1] // 128), (
        f"{msg}: scales {tuple(out_scales.shape)}"
    )
    expected_scales = gather_rows(sources, scales, torch.ones(rows.shape[1] // 128))
    assert torch.equal(out_scales[:n], expected_scales), f"{msg}: scales differ"


@pytest.mark.parametrize("local", [(0, None), (3, 4)], ids=["all_local", "experts_3_to_6"])
@pytest.mark.parametrize("align", [1, 16, 64, 128])
@pytest.mark.parametrize("T", [0, 1, 5, 33])
@pytest.mark.parametrize("mode", ["bf16", "fp32_h40", "quantize", "quantize_pow2", "fp8_input"])
def test_permute(mode, T, align, local, gen):
    e, k = 12, 4
    first, num_local = local
    n_local = e - first if num_local is None else num_local
    h = 40 if mode == "fp32_h40" else 256
    x = (torch.randn(T, h, generator=gen) * 3).to(torch.float32 if mode == "fp32_h40" else torch.bfloat16)
    if T:
        x[0, 3] = NAN  # data movement must carry any bit pattern
    ids = make_ids(T, k, e, gen, skip=(5,))  # expert 5 (local in both ranges) gets no token
    kwargs = dict(align=align, first_expert=first, num_local_experts=num_local)
    if mode.startswith("quantize"):
        pow2 = mode == "quantize_pow2"
        result = reference.permute(x, ids, e, quantize=True, pow2_scale=pow2, **kwargs)
        q, scales = reference.quantize_fp8(x, pow2)
        rows = q.view(torch.uint8)
    elif mode == "fp8_input":
        q, scales = reference.quantize_fp8(x)
        result = reference.permute(q, ids, e, x_scales=scales, **kwargs)
        rows = q.view(torch.uint8)
    else:
        result = reference.permute(x, ids, e, **kwargs)
        rows, scales = x, None
    msg = f"{mode=} {T=} {align=} {first=} {num_local=}"
    check_permute(result, ids, rows, scales, first, n_local, align, T * k + n_local * (align - 1), msg)


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize(
    "local", [(0, None), (4, 4), (0, 4)], ids=["all_local", "upper_half", "expert_not_local"]
)
@pytest.mark.parametrize("k", [1, 2])
def test_permute_all_tokens_on_one_expert(k, local, align, gen):
    t, e = 9, 8
    x = torch.randn(t, 128, generator=gen).to(torch.bfloat16)
    ids = torch.full((t, k), -1, dtype=torch.int32)
    ids[:, 0] = 6
    first, num_local = local
    n_local = e - first if num_local is None else num_local
    result = reference.permute(x, ids, e, align=align, first_expert=first, num_local_experts=num_local)
    msg = f"{k=} {first=} {num_local=} {align=}"
    check_permute(result, ids, x, None, first, n_local, align, t * k + n_local * (align - 1), msg)


@pytest.mark.parametrize("quantize", [False, True])
def test_permute_num_out_rows(quantize, gen):
    t, k, e, align = 7, 2, 4, 16
    x = torch.randn(t, 128, generator=gen).to(torch.bfloat16)
    ids = make_ids(t, k, e, gen)
    needed = loop_permute(ids.tolist(), k, 0, e, align)[1][-1]
    q, s = reference.quantize_fp8(x)
    rows, scales = (q.view(torch.uint8), s) if quantize else (x, None)
    for num_rows in (needed, needed + 5):
        result = reference.permute(x, ids, e, align=align, num_out_rows=num_rows, quantize=quantize)
        check_permute(result, ids, rows, scales, 0, e, align, num_rows, f"{quantize=} {num_rows=}")
    with pytest.raises(ValueError, match=f"num_out_rows={needed - 1} is smaller than the {needed} rows"):
        reference.permute(x, ids, e, align=align, num_out_rows=needed - 1, quantize=quantize)


_X = torch.ones(3, 256, dtype=torch.bfloat16)
_IDS = torch.zeros(3, 2, dtype=torch.int32)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: reference.permute(_X, _IDS + 4, 4), "expert_ids must be in [-1, 4)"),
        (lambda: reference.permute(_X, _IDS - 2, 4), "expert_ids must be in [-1, 4)"),
        (lambda: reference.permute(_X, _IDS, 4, align=8), "align must be one of (1, 16, 64, 128)"),
        (
            lambda: reference.permute(_X.to(FP8), _IDS, 4),
            "x is float8_e4m3fn: pass its 1x128 scales as x_scales",
        ),
        (
            lambda: reference.permute(_X[:, :40], _IDS, 4, quantize=True),
            "x's channels must be a multiple of 128",
        ),
        (lambda: reference.permute(_X, _IDS, 4, first_expert=3, num_local_experts=2), "local experts [3, 5)"),
        (lambda: reference.permute(_X, _IDS[:2], 4), "expert_ids has 2 rows, x has 3"),
    ],
    ids=["id_eq_E", "id_minus_2", "align_8", "fp8_no_scales", "quantize_H40", "local_range", "row_mismatch"],
)
def test_permute_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(f"permute: {message}")):
        call()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T", [0, 1, 9])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpermute(dtype, T, weighted, shared, gen):
    k, h, num_rows = 3, 64, 40
    y = (torch.randn(num_rows, h, generator=gen) * 4).to(dtype)
    y[0], y[-1] = NAN, NAN  # rows no kept pair points to: a dropped pair must not read them
    row_map = (torch.randperm(num_rows - 2, generator=gen)[: T * k] + 1).reshape(T, k)
    row_map[torch.rand(T, k, generator=gen) < 0.3] = -1
    row_map = row_map.to(torch.int32)
    weights = torch.rand(T, k, generator=gen) * 2 if weighted else None
    shared_output = torch.randn(T, h, generator=gen).to(dtype) if shared else None
    out = reference.unpermute(y, row_map, weights, shared_output=shared_output)
    expected = loop_unpermute(y, row_map, weights, shared_output)
    msg = f"{dtype=} {T=} {weighted=} {shared=}"
    assert not torch.isnan(expected).any(), msg
    assert out.dtype == dtype and torch.equal(out, expected), f"{msg}: {out} != {expected}"


@pytest.mark.parametrize("shared", [False, True])
def test_unpermute_every_pair_dropped_and_no_rows(shared, gen):
    # What ep_combine hands unpermute on a rank whose tokens were all dropped: no rows, row_map all -1.
    y = torch.zeros(0, 64, dtype=torch.bfloat16)
    row_map = torch.full((2, 3), -1, dtype=torch.int32)
    shared_output = torch.randn(2, 64, generator=gen).to(torch.bfloat16) if shared else None
    out = reference.unpermute(y, row_map, torch.rand(2, 3, generator=gen), shared_output=shared_output)
    expected = shared_output if shared else torch.zeros(2, 64, dtype=torch.bfloat16)
    assert torch.equal(out, expected), f"{shared=}: {out}"


# ------------------------------------------------------------------------------------------------
# Grouped GEMM, SwiGLU, expert MLP
# ------------------------------------------------------------------------------------------------

GEMM_OFFSETS = {  # name: (rows, offsets)
    "empty_expert": (20, [0, 5, 5, 17, 20]),
    "rows_outside_and_padding": (30, [3, 3, 10, 10, 26]),
    "all_empty": (6, [0, 0, 0, 0, 0]),
}


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offsets_name", list(GEMM_OFFSETS))
@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8_pow2"])
def test_grouped_gemm(mode, offsets_name, out_dtype, gen):
    m, offs = GEMM_OFFSETS[offsets_name]
    e, n, k = 4, 192, 256
    a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    a[offs[2] - 2 : offs[2]] = 0  # zero padding rows at the end of an expert's segment
    b = (torch.randn(e, n, k, generator=gen) * 0.05).to(torch.bfloat16)
    offsets = torch.tensor(offs, dtype=torch.int32)
    if mode == "bf16":
        out = reference.grouped_gemm(a, b, offsets, out_dtype=out_dtype)
        a64, b64 = a.double(), b.double()
    else:
        pow2 = mode == "fp8_pow2"
        (aq, a_s), (bq, b_s) = reference.quantize_fp8(a, pow2), reference.quantize_fp8_weight(b, pow2)
        out = reference.grouped_gemm(aq, bq, offsets, a_scales=a_s, b_scales=b_s, out_dtype=out_dtype)
        a64, b64 = loop_dequantize(aq, a_s, 1), loop_dequantize(bq, b_s, 128)
    msg = f"{mode=} {offsets_name=} {out_dtype=}"
    assert out.dtype == out_dtype and out.shape == (m, n), f"{msg}: {out.dtype} {tuple(out.shape)}"
    assert not out[: offs[0]].any() and not out[offs[-1] :].any(), f"{msg}: rows outside the experts not zero"
    tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-5
    assert_rel_close(out, loop_grouped_gemm(a64, b64, offs), tol, msg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [0, 1, 5])
def test_silu_and_mul(m, dtype, gen):
    h = (torch.randn(m, 96, generator=gen) * 3).to(dtype)
    out = reference.silu_and_mul(h)
    msg = f"{m=} {dtype=}"
    assert out.dtype == torch.float32 and out.shape == (m, 48), f"{msg}: {out.dtype} {tuple(out.shape)}"
    torch.testing.assert_close(
        out.double(), loop_silu_and_mul(h), rtol=1e-5, atol=1e-6, msg=lambda s: f"{msg}: {s}"
    )


@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8_pow2"])
def test_expert_mlp(mode, gen):
    e, h, inter, m = 3, 256, 128, 24
    offs = [0, 7, 7, 20]  # expert 1 empty; rows 20..23 belong to no expert
    x = torch.randn(m, h, generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(e, 2 * inter, h, generator=gen) * 0.06).to(torch.bfloat16)
    down = (torch.randn(e, h, inter, generator=gen) * 0.09).to(torch.bfloat16)
    offsets = torch.tensor(offs, dtype=torch.int32)
    fp8, pow2 = mode != "bf16", mode == "fp8_pow2"
    if fp8:
        (xq, xs), (gq, gs), (dq, ds) = (
            reference.quantize_fp8(x, pow2),
            reference.quantize_fp8_weight(gate_up, pow2),
            reference.quantize_fp8_weight(down, pow2),
        )
        out = reference.expert_mlp(
            xq, offsets, gq, dq, x_scales=xs, w_gate_up_scales=gs, w_down_scales=ds, pow2_scale=pow2
        )
        x64, gate_up64, down64 = (
            loop_dequantize(xq, xs, 1),
            loop_dequantize(gq, gs, 128),
            loop_dequantize(dq, ds, 128),
        )
    else:
        out = reference.expert_mlp(x, offsets, gate_up, down)
        x64, gate_up64, down64 = x.double(), gate_up.double(), down.double()
    expected = loop_expert_mlp(x64, offs, gate_up64, down64, fp8, pow2)
    assert out.dtype == torch.bfloat16 and out.shape == (m, h), f"{mode=}: {out.dtype} {tuple(out.shape)}"
    assert not out[offs[-1] :].any(), f"{mode=}: rows outside the experts not zero"
    assert_rel_close(out, expected, 1e-2, f"{mode=}")
