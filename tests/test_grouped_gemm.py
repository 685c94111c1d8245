"""Grouped GEMMs and the expert MLP: CPU path and schemas everywhere, the kernels (CUTLASS's and our
own wgmma kernels) on Hopper.

FP8 is compared with the reference on the same quantised inputs (calc_diff < 1e-3); BF16 with the
fp32 reference, within 2x the error of PyTorch's own bf16 matmul on the same inputs.
"""

import itertools

import pytest
import torch
from conftest import requires_sm90

import moe_kernels
from moe_kernels import reference
from moe_kernels.testing import BF16_ERROR_FACTOR, FP8_GEMM_CALC_DIFF, calc_diff, rel_error

FP8 = torch.float8_e4m3fn
FP8_CONFIGS = [c for c in moe_kernels.GEMM_CONFIGS if c == "auto" or c.startswith("fp8")]
BF16_CONFIGS = [c for c in moe_kernels.GEMM_CONFIGS if c == "auto" or c.startswith("bf16")]


def offsets_from_counts(counts, head=0):
    """int32 [E + 1] offsets for the given rows per expert, starting at row `head`."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return (offsets + head).to(torch.int32)


def make_problem(counts, n, k, fp8, gen, *, head=0, tail=0, device="cpu"):
    """Random operands: a [head + sum(counts) + tail, K], b [E, N, K], offsets (and FP8 scales)."""
    m = head + sum(counts) + tail
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(len(counts), n, k, generator=gen) / k**0.5
    offsets = offsets_from_counts(counts, head)
    if fp8:
        a, a_scales = reference.quantize_fp8(a)
        b, b_scales = reference.quantize_fp8_weight(b)
        tensors = (a, b, offsets, a_scales, b_scales)
    else:
        tensors = (a.bfloat16(), b.bfloat16(), offsets, None, None)
    return tuple(None if t is None else t.to(device) for t in tensors)


def run_reference(a, b, offsets, a_scales, b_scales):
    return reference.grouped_gemm(
        a, b, offsets, a_scales=a_scales, b_scales=b_scales, out_dtype=torch.float32
    )


# Loads: balanced, skewed, one expert with everything, empty experts, the edge sizes of the issue.
LOADS = {
    "balanced_e8": [512] * 8,
    "skewed_e32": [int(4000 * 0.7**i) for i in range(32)],
    "single_expert_e8": [0, 0, 0, 3000, 0, 0, 0, 0],
    "edges_e8": [0, 1, 7, 129, 4000, 0, 64, 65],
    "decode_e256": [(i * 7) % 5 for i in range(256)],
    "e128": [(i * 13) % 97 for i in range(128)],
    "e384": [(i * 3) % 11 for i in range(384)],
    # fp8_wgmma_tall_*: an expert's last m-tile takes up to 192 rows (192: one tile with a full
    # 64-row tail, 193: 128 + 65, 320: 128 + 192, 321: three tiles)
    "tall_edges_e8": [192, 193, 320, 321, 191, 256, 257, 64],
    # fp8_wgmma_tall_*_swap: tails of up to 16 rows as an n16, up to 32 as an n32, longer as the n64
    # (tails of 16, 17, 32, 33, 2, 22, 47 rows)
    "tall_tails_e8": [144, 145, 160, 161, 130, 150, 175, 0],
}


# ------------------------------------------------------------------------------------------------
# Everywhere: schemas, fake kernels, CPU path, errors
# ------------------------------------------------------------------------------------------------


def test_schemas_registered():
    for name in ("grouped_gemm", "grouped_gemm_out", "silu_mul"):
        assert hasattr(torch.ops.moe_kernels, name), name


@pytest.mark.parametrize("fp8", [False, True])
def test_cpu_path_matches_reference(fp8, gen):
    a, b, offsets, sa, sb = make_problem([3, 0, 5], 256, 256, fp8, gen, head=2, tail=1)
    out = moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb)
    ref = reference.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=100), "K .* must be a positive multiple of 128"),
        (dict(n=200), "N .* must be a positive multiple of 128"),
        (dict(drop_scales=True), "FP8 operands need a_scales and b_scales"),
        (dict(offsets_len=2), r"expert_offsets must be \[experts \+ 1"),
        (dict(config="fp8_huge"), "config must be"),
    ],
)
def test_bad_arguments_raise(change, message, gen):
    n, k = change.get("n", 256), change.get("k", 256)
    a = torch.randn(8, k, generator=gen).to(FP8)
    b = torch.randn(2, n, k, generator=gen).to(FP8)
    sa, sb = torch.ones(8, max(k // 128, 1)), torch.ones(2, max(n // 128, 1), max(k // 128, 1))
    offsets = torch.tensor([0, 4, 8] if "offsets_len" not in change else [0, 8], dtype=torch.int32)
    if change.get("drop_scales"):
        sa = sb = None
    with pytest.raises(ValueError, match=message):
        moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config=change.get("config", "auto"))


@pytest.mark.parametrize(
    "offsets, where",
    [([0, 5, 3], r"\[2\] = 3 after 5"), ([-1, 4, 8], r"\[0\] = -1"), ([0, 4, 9], r"\[2\] = 9 after 4")],
)
def test_bad_offset_values_raise_on_cpu(offsets, where, gen):
    a, b, _, sa, sb = make_problem([4, 4], 256, 256, True, gen)
    offsets = torch.tensor(offsets, dtype=torch.int32)
    message = r"expert_offsets must be non-decreasing within \[0, rows of a = 8\], got expert_offsets" + where
    with pytest.raises(ValueError, match=message):
        moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb)
    with pytest.raises(ValueError, match=message):
        out = torch.empty(8, 256, dtype=torch.bfloat16)
        moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, out=out)


def test_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(10, 256, dtype=FP8), torch.empty(4, 384, 256, dtype=FP8)
        offsets = torch.empty(5, dtype=torch.int32)
        out = torch.ops.moe_kernels.grouped_gemm(a, b, offsets, torch.empty(10, 2), torch.empty(4, 3, 2))
        assert out.shape == (10, 384) and out.dtype == torch.bfloat16
        act, scales = torch.ops.moe_kernels.silu_mul(
            torch.empty(10, 512, dtype=torch.bfloat16), offsets, True, False
        )
        assert act.shape == (10, 256) and act.dtype == FP8 and scales.shape == (10, 2)


@pytest.mark.parametrize("fp8", [False, True])
def test_expert_mlp_cpu(fp8, gen):
    x, w_gu, offsets, sx, s_gu = make_problem([2, 0, 3], 512, 256, fp8, gen)
    w_down = torch.randn(3, 256, 256, generator=gen) / 16
    w_down, s_down = reference.quantize_fp8_weight(w_down) if fp8 else (w_down.bfloat16(), None)
    out = moe_kernels.expert_mlp(
        x, offsets, w_gu, w_down, x_scales=sx, w_gate_up_scales=s_gu, w_down_scales=s_down
    )
    ref = reference.expert_mlp(
        x, offsets, w_gu, w_down, x_scales=sx, w_gate_up_scales=s_gu, w_down_scales=s_down
    )
    assert torch.equal(out, ref)


OPCHECK_FP8_INPUTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_all(device, gen):
    # Offsets cover every row, so no output row is left unwritten (opcheck compares whole outputs).
    for fp8 in (False, True):
        a, b, offsets, sa, sb = make_problem([3, 0, 5], 256, 256, fp8, gen, device=device)
        utils = OPCHECK_FP8_INPUTS if fp8 else ("test_schema", *OPCHECK_FP8_INPUTS)
        torch.library.opcheck(
            torch.ops.moe_kernels.grouped_gemm.default, (a, b, offsets, sa, sb), test_utils=utils
        )
    h = torch.randn(6, 512, generator=gen).bfloat16().to(device)
    for quantize in (False, True):
        torch.library.opcheck(torch.ops.moe_kernels.silu_mul.default, (h, None, quantize, False))


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


# ------------------------------------------------------------------------------------------------
# Hopper: the kernels
# ------------------------------------------------------------------------------------------------


@requires_sm90
@pytest.mark.parametrize("load", sorted(LOADS))
@pytest.mark.parametrize("config", FP8_CONFIGS)
def test_fp8_matches_reference(load, config, gen):
    counts = LOADS[load]
    a, b, offsets, sa, sb = make_problem(counts, 256, 512, True, gen, head=3, tail=5, device="cuda")
    out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, out=out, config=config)
    ref = run_reference(a, b, offsets, sa, sb)
    lo, hi = 3, 3 + sum(counts)
    case = f"{load=} {config=}"
    if hi > lo:
        diff = calc_diff(out[lo:hi].float(), ref[lo:hi])
        assert diff < FP8_GEMM_CALC_DIFF, f"{case}: calc_diff {diff}"
        assert torch.isfinite(out[lo:hi]).all(), f"{case}: rows of experts left unwritten"
    assert torch.isnan(out[:lo]).all() and torch.isnan(out[hi:]).all(), (
        f"{case}: rows outside experts were written"
    )


def check_bf16(out, a, b, offsets, case):
    """BF16 out within BF16_ERROR_FACTOR x the error of torch's bf16 matmul on the expert rows."""
    bounds = offsets.tolist()
    lo, hi = bounds[0], bounds[-1]
    ref = run_reference(a, b, offsets, None, None)[lo:hi]
    torch_bf16 = torch.cat(
        [a[start:end] @ b[e].T for e, (start, end) in enumerate(itertools.pairwise(bounds))]
    )
    ours, theirs = rel_error(out[lo:hi], ref), rel_error(torch_bf16, ref)
    assert ours <= BF16_ERROR_FACTOR * theirs + 1e-6, f"{case}: error {ours} vs torch bf16 {theirs}"


@requires_sm90
@pytest.mark.parametrize("load", ["balanced_e8", "skewed_e32", "single_expert_e8", "edges_e8", "decode_e256"])
@pytest.mark.parametrize("config", BF16_CONFIGS)
def test_bf16_matches_reference(load, config, gen):
    """N = 384: a 128-column N tail after a 256-wide tile; unused rows before and after the experts
    must keep their NaN."""
    counts = LOADS[load]
    a, b, offsets, _, _ = make_problem(counts, 384, 256, False, gen, head=3, tail=5, device="cuda")
    out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=torch.bfloat16, device="cuda")
    moe_kernels.grouped_gemm(a, b, offsets, out=out, config=config)
    lo, hi = 3, 3 + sum(counts)
    case = f"{load=} {config=}"
    check_bf16(out, a, b, offsets, case)
    assert torch.isfinite(out[lo:hi]).all(), f"{case}: rows of experts left unwritten"
    assert torch.isnan(out[:lo]).all() and torch.isnan(out[hi:]).all(), (
        f"{case}: rows outside experts were written"
    )


@requires_sm90
@pytest.mark.parametrize("shape", [(7168, 2048), (4096, 7168), (2048, 768)])
@pytest.mark.parametrize("config", BF16_CONFIGS)
def test_bf16_model_shapes(shape, config, gen):
    """The DeepSeek-V3 and Qwen3 expert shapes (N, K) with a few experts (long K: many k-blocks)."""
    n, k = shape
    a, b, offsets, _, _ = make_problem([300, 0, 45, 129], n, k, False, gen, device="cuda")
    out = moe_kernels.grouped_gemm(a, b, offsets, config=config)
    check_bf16(out, a, b, offsets, f"{shape=} {config=}")


@requires_sm90
@pytest.mark.parametrize("fp8, config", [(False, c) for c in BF16_CONFIGS] + [(True, c) for c in FP8_CONFIGS])
def test_zero_rows(fp8, config, gen):
    """No rows at all (M = 0): an empty output, no launch."""
    a, b, offsets, sa, sb = make_problem([0, 0, 0], 256, 256, fp8, gen, device="cuda")
    out = moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config=config)
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16, f"{fp8=} {config=}: {out.shape}"
    moe_kernels.check_device_errors()


@requires_sm90
@pytest.mark.parametrize("shape", [(7168, 2048), (4096, 7168), (2048, 768), (3072, 4096), (4096, 1536)])
@pytest.mark.parametrize("config", FP8_CONFIGS)
def test_fp8_model_shapes(shape, config, gen):
    """The DeepSeek-V3 and Qwen3 expert shapes (N, K) with a few experts; the fp8_wgmma_*kc_*
    configurations have K compiled in for K = 7168, 4096, 2048 and 1536 (K = 768 takes their
    run-time-K kernels), the 45- and 129-row experts leave a warpgroup idle in a tail tile, and
    129, 150, 192 and 300 rows end in a tall tile of fp8_wgmma_tall_* (192: its 64-row tail whole;
    tails of 1, 22, 64 and 44 rows: the *_swap configuration's n16, n32 and n64)."""
    n, k = shape
    a, b, offsets, sa, sb = make_problem([300, 0, 45, 129, 192, 150], n, k, True, gen, device="cuda")
    out = moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config=config)
    diff = calc_diff(out.float(), run_reference(a, b, offsets, sa, sb))
    assert diff < FP8_GEMM_CALC_DIFF, f"{shape=} {config=}: calc_diff {diff}"


@requires_sm90
@pytest.mark.parametrize("fp8, config", [(False, "auto"), (False, "bf16_wgmma_128x256"), (True, "auto")])
def test_cuda_graph_replay_with_new_offsets(fp8, config, gen):
    a, b, offsets, sa, sb = make_problem([100, 50, 0, 106], 256, 256, fp8, gen, device="cuda")
    run = lambda: moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config=config)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for counts in ([0, 0, 256, 0], [1, 2, 3, 250], [64, 64, 64, 64]):
        offsets.copy_(offsets_from_counts(counts).cuda())
        graph.replay()
        ref = run_reference(a, b, offsets, sa, sb)
        err = calc_diff(out.float(), ref) if fp8 else rel_error(out, ref)
        assert err < (FP8_GEMM_CALC_DIFF if fp8 else 1e-2), f"{counts=} {config=}: error {err}"


@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
def test_wgmma_configs_take_at_most_1024_experts(fp8, gen):
    """Our kernels keep the offsets in shared memory: named, their configurations refuse more than
    1024 experts; "auto" runs CUTLASS's cooperative tile there (65 rows per expert: not the small
    path)."""
    counts = [65] * 1025
    a, b, offsets, sa, sb = make_problem(counts, 128, 128, fp8, gen, device="cuda")
    configs = FP8_CONFIGS if fp8 else BF16_CONFIGS
    for config in [c for c in configs if "wgmma" in c]:
        with pytest.raises(ValueError, match=f"grouped_gemm: config '{config}' takes at most 1024 experts"):
            moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config=config)
    out = moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb)
    ref = run_reference(a, b, offsets, sa, sb)
    err = calc_diff(out.float(), ref) if fp8 else rel_error(out, ref)
    assert err < (FP8_GEMM_CALC_DIFF if fp8 else 1e-2), f"auto with 1025 experts, {fp8=}: error {err}"


def kernel_rows(offsets, rows):
    """Rows each expert gets from corrupt offsets, as setup_grouped_args clamps them."""
    clamped = [min(max(o, 0), rows) for o in offsets]
    return [(lo, max(hi, lo)) for lo, hi in itertools.pairwise(clamped)]


@requires_sm90
@pytest.mark.parametrize("fp8, config", [(False, c) for c in BF16_CONFIGS] + [(True, c) for c in FP8_CONFIGS])
@pytest.mark.parametrize(
    "offsets", [[0, 100, 200, 150, 400], [-50, 100, 200, 300, 400], [0, 100, 200, 300, 4000]]
)
def test_bad_offsets_are_clamped_and_reported(offsets, fp8, config, gen):
    """Corrupt device offsets: rows are clamped into [0, M] (nothing outside the tensors is
    touched), experts whose clamped rows overlap no other's are still right, and the error is raised
    by check_device_errors() or, without a sync, by the next call. FP8 "auto" runs our own kernel
    (100 rows per expert), BF16 "auto" CUTLASS's; the other configurations name theirs."""
    moe_kernels.check_device_errors()
    a, b, good_offsets, sa, sb = make_problem([100] * 4, 256, 256, fp8, gen, device="cuda")
    bad = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    # no raise: found on the device
    out = moe_kernels.grouped_gemm(a, b, bad, a_scales=sa, b_scales=sb, config=config)
    ranges = kernel_rows(offsets, a.shape[0])
    overlaps = lambda r, s: max(r[0], s[0]) < min(r[1], s[1])
    alone = [
        e
        for e, r in enumerate(ranges)
        if r[1] > r[0] and not any(overlaps(r, s) for f, s in enumerate(ranges) if f != e)
    ]
    assert alone, f"test setup: {offsets=} leaves no expert alone"
    for e in alone:
        lo, hi = ranges[e]
        only_e = offsets_from_counts([hi - lo if f == e else 0 for f in range(len(ranges))], head=lo)
        ref = run_reference(a, b, only_e.cuda(), sa, sb)[lo:hi]
        err = calc_diff(out[lo:hi].float(), ref) if fp8 else rel_error(out[lo:hi], ref)
        assert err < (FP8_GEMM_CALC_DIFF if fp8 else 1e-2), f"{offsets=} {fp8=} expert {e}: error {err}"
    message = r"grouped_gemm: expert_offsets were not non-decreasing.*\(detected on the device during"
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.check_device_errors()
    moe_kernels.grouped_gemm(a, b, bad, a_scales=sa, b_scales=sb, config=config)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=message):  # the next call raises, without a sync
        moe_kernels.grouped_gemm(a, b, good_offsets, a_scales=sa, b_scales=sb)
    moe_kernels.grouped_gemm(a, b, good_offsets, a_scales=sa, b_scales=sb)  # reported once, then clear
    moe_kernels.check_device_errors()


@requires_sm90
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@requires_sm90
def test_compile_fullgraph(gen):
    a, b, offsets, sa, sb = make_problem([10, 20], 256, 256, True, gen, device="cuda")
    fn = lambda a, b, o, sa, sb: moe_kernels.grouped_gemm(a, b, o, a_scales=sa, b_scales=sb).float().sum(-1)
    assert torch.equal(torch.compile(fn, fullgraph=True)(a, b, offsets, sa, sb), fn(a, b, offsets, sa, sb))


@requires_sm90
@pytest.mark.parametrize("quantize", [False, True])
def test_silu_mul_matches_reference(quantize, gen):
    h = (torch.randn(300, 2 * 768, generator=gen) * 3).bfloat16()
    offsets = torch.tensor([5, 100, 290], dtype=torch.int32)
    act, scales = moe_kernels.silu_mul(h.cuda(), offsets.cuda(), quantize=quantize)
    ref = reference.silu_and_mul(h)[5:290]
    if quantize:
        ref_q, ref_s = reference.quantize_fp8(ref)
        got = reference.dequantize_fp8(act[5:290].cpu(), scales[5:290].cpu(), torch.float32)
        want = reference.dequantize_fp8(ref_q, ref_s, torch.float32)
        # fp32 SiLU may differ from torch's by an ulp, which can move a value to the next e4m3 step.
        assert torch.allclose(scales[5:290].cpu(), ref_s, rtol=1e-6)
        assert ((got - want).abs() <= want.abs() * 2**-3 + ref_s.repeat_interleave(128, 1) * 2**-8).all()
        assert (got != want).float().mean() < 1e-3
    else:
        torch.testing.assert_close(act[5:290].cpu().float(), ref, rtol=8e-3, atol=1e-5)


@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
def test_expert_mlp_matches_reference(fp8, gen):
    e, hidden, inter = 8, 512, 256
    counts = [0, 1, 7, 129, 300, 0, 64, 3]
    x, w_gu, offsets, sx, s_gu = make_problem(counts, 2 * inter, hidden, fp8, gen, device="cuda")
    w_down = torch.randn(e, hidden, inter, generator=gen) / inter**0.5
    w_down, s_down = reference.quantize_fp8_weight(w_down) if fp8 else (w_down.bfloat16(), None)
    w_down, s_down = w_down.cuda(), None if s_down is None else s_down.cuda()
    out = moe_kernels.expert_mlp(
        x, offsets, w_gu, w_down, x_scales=sx, w_gate_up_scales=s_gu, w_down_scales=s_down
    )
    ref = reference.expert_mlp(
        x, offsets, w_gu, w_down, x_scales=sx, w_gate_up_scales=s_gu, w_down_scales=s_down
    )
    err = calc_diff(out.float(), ref.float())
    assert err < (2e-3 if fp8 else 1e-4), f"{fp8=}: calc_diff {err}"
