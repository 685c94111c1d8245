"""Router, balance losses and bias update: CPU path and schemas everywhere, CUDA kernels on Hopper.

Selection is checked against the reference exactly where the choice is clear and within fp32
near-ties elsewhere (moe_kernels.testing.assert_router_matches_reference); counts and the bias
update are exact; weights and gradients within the fp32 tolerances of moe_kernels.testing.
"""

import pytest
import torch
from conftest import requires_sm90

import moe_kernels
from moe_kernels import PRESETS, reference
from moe_kernels.testing import assert_router_matches_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(t, preset_or_e, gen, dtype=torch.float32, device="cpu", with_bias=None):
    e = preset_or_e.num_experts if hasattr(preset_or_e, "num_experts") else preset_or_e
    logits = (torch.randn(t, e, generator=gen) * 2).to(dtype)
    use_bias = with_bias if with_bias is not None else getattr(preset_or_e, "uses_bias", False)
    bias = torch.randn(e, generator=gen) * 0.1 if use_bias else None
    return logits.to(device), None if bias is None else bias.to(device)


def run_router(logits, top_k, bias, config):
    out = moe_kernels.router(logits, top_k, bias=bias, return_counts=True, **config)
    return out.weights, out.ids, out.counts


def check_against_reference(logits, top_k, bias, config, case):
    weights, ids, counts = run_router(logits, top_k, bias, config)
    assert weights.shape == ids.shape == (logits.shape[0], top_k), case
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and counts.dtype == torch.int32, case
    try:
        assert_router_matches_reference(logits, weights, ids, top_k, bias=bias, **config)
    except AssertionError as err:
        raise AssertionError(f"{case}: {err}") from None
    expected_counts = torch.bincount(ids.cpu().long().flatten(), minlength=logits.shape[1]).int()
    assert torch.equal(counts.cpu(), expected_counts), f"{case}: counts"
    return weights, ids


# Shapes beyond the presets: non-powers of two, small and large E, every K bound, the generic
# (shared-memory) group path (E=72 G=8, E=144 G=16, E=96 G=32) and the lane-local one.
# The four-tokens-per-warp kernel (sigmoid, E = 256, K <= 8, from 1024 tokens): every group count.
QUAD_CONFIGS = [
    (256, 8, dict(score_func="sigmoid")),
    (256, 6, dict(num_groups=2, topk_groups=1, score_func="sigmoid")),
    (256, 4, dict(num_groups=4, topk_groups=2, group_score="max", score_func="sigmoid")),
    (256, 1, dict(num_groups=8, topk_groups=1, score_func="sigmoid", renormalize=False, scaling_factor=2.5)),
    (256, 8, dict(num_groups=8, topk_groups=4, score_func="sigmoid")),
]
QUAD_MIN_TOKENS = 1024  # kQuadMinTokens in csrc/router/dispatch.h

EXTRA_CONFIGS = [
    (2, 1, dict()),
    (2, 2, dict(score_func="sigmoid")),
    (8, 8, dict()),
    (60, 4, dict(renormalize=False)),
    (72, 6, dict(num_groups=8, topk_groups=3, group_score="max")),
    (72, 6, dict(num_groups=8, topk_groups=3, group_score="top2_sum", score_func="sigmoid")),
    (96, 4, dict(num_groups=32, topk_groups=4, group_score="max")),
    (128, 16, dict(num_groups=4, topk_groups=2, score_func="sigmoid")),
    (144, 8, dict(num_groups=16, topk_groups=4)),
    (160, 6, dict(num_groups=8, topk_groups=3, group_score="max", renormalize=False, scaling_factor=16.0)),
    (256, 16, dict(num_groups=8, topk_groups=8, score_func="sigmoid")),
    # The two-tokens-per-warp kernel's other group counts: 2 groups of 8 lanes, 16 of one lane.
    (64, 4, dict(num_groups=2, topk_groups=1, score_func="sigmoid")),
    (256, 8, dict(num_groups=16, topk_groups=3, group_score="max", score_func="sigmoid")),
    (384, 8, dict(score_func="sigmoid", scaling_factor=2.827)),
    # The shapes of the four-tokens-per-warp kernel (below 1024 tokens the pair kernel runs them;
    # test_quad_kernel_configs runs the quad kernel).
    *QUAD_CONFIGS,
    (512, 16, dict(num_groups=16, topk_groups=2)),
    (1000, 3, dict(num_groups=10, topk_groups=1, group_score="max")),
    (1024, 16, dict(score_func="sigmoid", num_groups=32, topk_groups=5)),
]


# ------------------------------------------------------------------------------------------------
# Everywhere: schemas, CPU path, fake kernels, errors, opcheck, compile, autograd registration
# ------------------------------------------------------------------------------------------------


def test_schemas_registered():
    for name in ("router", "router_backward", "balance_loss", "balance_loss_backward", "update_expert_bias"):
        assert hasattr(torch.ops.moe_kernels, name), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cpu_path_matches_reference(name, gen):
    preset = PRESETS[name]
    logits, bias = make_inputs(9, preset, gen)
    out = moe_kernels.router_preset(logits, name, bias=bias, return_counts=True)
    w, ids, counts = reference.router(logits, preset.top_k, bias=bias, **preset.router_kwargs())
    assert torch.equal(out.ids, ids) and torch.equal(out.counts, counts)
    torch.testing.assert_close(out.weights, w.detach())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k must be in"),
        (dict(top_k=17), "top_k must be in"),
        (dict(num_groups=5), "num_groups must be in"),
        (dict(num_groups=4, topk_groups=5), "topk_groups must be in"),
        (dict(num_groups=32, topk_groups=1, top_k=8), "exceeds the experts in the kept groups"),
        (dict(score_func="relu"), "score_func must be"),
        (dict(group_score="mean"), "group_score must be"),
        (dict(bias=torch.zeros(63)), "bias must be"),
        (dict(bias=torch.zeros(64, dtype=torch.float64)), "bias must be float32"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    kwargs = {"top_k": 4, **kwargs}
    top_k = kwargs.pop("top_k")
    with pytest.raises(ValueError, match=message):
        moe_kernels.router(torch.randn(3, 64), top_k, **kwargs)


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError, match=r"logits must be 2-D \[tokens, experts\]"):
        moe_kernels.router(torch.randn(3, 4, 64), 2)
    with pytest.raises(ValueError, match=r"must be in \[2, 1024\], got 1025"):
        moe_kernels.router(torch.randn(3, 1025), 2)


def test_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(5, 256)
        w, ids, counts = torch.ops.moe_kernels.router(
            logits, 8, None, "sigmoid", 8, 4, "top2_sum", True, 2.5, True
        )
        assert w.shape == (5, 8) and ids.dtype == torch.int32 and counts.shape == (256,)
        loss, coeffs = torch.ops.moe_kernels.balance_loss(logits, ids, None, "sigmoid", 0, 1.0)
        assert loss.shape == () and coeffs.shape == (1, 256)


def _opcheck_all(device, gen):
    logits, bias = make_inputs(6, PRESETS["deepseek_v3"], gen, device=device)
    cfg = ("sigmoid", 8, 4, "top2_sum", True, 2.5)
    torch.library.opcheck(torch.ops.moe_kernels.router.default, (logits, 8, bias, *cfg, True))
    torch.library.opcheck(
        torch.ops.moe_kernels.router.default,
        (logits[:, :64], 6, None, "softmax", 1, 1, "max", False, 1.0, False),
    )
    _, ids, _ = torch.ops.moe_kernels.router(logits, 8, bias, *cfg, False)
    offsets = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    torch.library.opcheck(
        torch.ops.moe_kernels.balance_loss.default, (logits, ids, offsets, "sigmoid", 0, 0.1)
    )
    torch.library.opcheck(torch.ops.moe_kernels.balance_loss.default, (logits, ids, None, "softmax", 8, 1.0))
    counts = torch.randint(0, 50, (256,), dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.moe_kernels.update_expert_bias.default, (bias.clone(), counts, 1e-3))


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


def test_compile_fullgraph_cpu(gen):
    logits, bias = make_inputs(7, PRESETS["deepseek_v3"], gen)

    def fn(logits, bias):
        out = moe_kernels.router_preset(logits, "deepseek_v3", bias=bias, return_counts=True)
        return out.weights * 2, out.ids, out.counts

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(logits, bias), fn(logits, bias), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_cpu_autograd_matches_reference(score_func, renormalize, gen):
    logits = torch.randn(5, 32, generator=gen, requires_grad=True)
    cfg = dict(score_func=score_func, renormalize=renormalize, scaling_factor=2.0)
    w = moe_kernels.router(logits, 4, **cfg).weights
    grad_out = torch.randn(w.shape, generator=gen)
    (grad,) = torch.autograd.grad(w, logits, grad_out)
    w_ref, _, _ = reference.router(logits, 4, **cfg)
    (grad_ref,) = torch.autograd.grad(w_ref, logits, grad_out)
    torch.testing.assert_close(grad, grad_ref)


def test_cpu_balance_loss_and_bias_update(gen):
    logits = torch.randn(12, 16, generator=gen, requires_grad=True)
    ids = reference.router(logits, 4)[1]
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    loss = moe_kernels.balance_loss(logits, ids, alpha=0.3, num_devices=4, seq_offsets=offsets)
    ref = reference.balance_loss(logits, ids, alpha=0.3, num_devices=4, seq_lens=[5, 0, 7])
    torch.testing.assert_close(loss, ref.detach())
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, grad_ref)
    bias = torch.randn(16, generator=gen)
    counts = torch.randint(0, 9, (16,), generator=gen, dtype=torch.int32)
    expected = reference.update_expert_bias(bias.clone(), counts, 1e-3)
    assert torch.equal(moe_kernels.update_expert_bias_(bias, counts, 1e-3), expected)


# ------------------------------------------------------------------------------------------------
# Hopper: the fused kernels against the reference
# ------------------------------------------------------------------------------------------------


@requires_sm90
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0, 1, 7, 1000])
def test_presets_cuda(name, dtype, t, gen):
    preset = PRESETS[name]
    logits, bias = make_inputs(t, preset, gen, dtype, "cuda")
    check_against_reference(logits, preset.top_k, bias, preset.router_kwargs(), f"{name=} {dtype=} {t=}")


@requires_sm90
@pytest.mark.parametrize("e, k, config", EXTRA_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_cuda(e, k, config, dtype, gen):
    for use_bias in (False, True):
        logits, bias = make_inputs(300, e, gen, dtype, "cuda", with_bias=use_bias)
        check_against_reference(logits, k, bias, config, f"{e=} {k=} {config} {dtype=} {use_bias=}")


@requires_sm90
@pytest.mark.parametrize("e, k, config", QUAD_CONFIGS)
@pytest.mark.parametrize("t", [QUAD_MIN_TOKENS, QUAD_MIN_TOKENS + 3])
def test_quad_kernel_configs(e, k, config, t, gen):
    """The quad kernel's shapes at token counts it runs (one not a multiple of four)."""
    logits, bias = make_inputs(t, e, gen, torch.float32, "cuda", with_bias=True)
    check_against_reference(logits, k, bias, config, f"{e=} {k=} {config} {t=}")


@requires_sm90
def test_many_tokens_cuda(gen):
    """More tokens than warps in the grid: every warp loops; counts stay exact."""
    preset = PRESETS["deepseek_v3"]
    logits, bias = make_inputs(200_000, preset, gen, torch.float32, "cuda")
    check_against_reference(logits, preset.top_k, bias, preset.router_kwargs(), "T=200000")


@requires_sm90
@pytest.mark.parametrize("config", [dict(), dict(score_func="sigmoid", num_groups=8, topk_groups=4)])
def test_exact_ties_lower_index_wins(config):
    """Duplicate logits give exactly equal scores on both sides: the lower index must win."""
    e, k = 64, 6
    logits = torch.zeros(4, e)
    logits[1] = torch.arange(e) % 4  # four-way ties at each value
    logits[2, 10:20] = 5.0  # ten tied maxima
    logits[3] = torch.arange(e).flip(0) // 8  # ties inside each group
    w, ids, _ = run_router(logits.cuda(), k, None, config)
    _, ref_ids, _ = reference.router(logits, k, **config)
    assert torch.equal(ids.cpu(), ref_ids), f"{config}: {ids.cpu().tolist()} vs {ref_ids.tolist()}"
    assert ids[0].tolist() == list(range(k)) and ids[2].tolist() == list(range(10, 16))


@requires_sm90
@pytest.mark.parametrize(
    "k, config",
    [
        (8, PRESETS["deepseek_v3"].router_kwargs()),
        (8, dict(score_func="sigmoid")),
        (3, dict(score_func="sigmoid")),
    ],
)
def test_quad_kernel_ties_nan_inf(k, config):
    """E = 256 sigmoid (four tokens per warp, so at least 1024 tokens): ties, NaN and inf rows, the
    exact fallback (all-equal rows), and a token count that is not a multiple of four, against the
    reference's ids. The 11 special rows repeat down the batch, so every quarter of a warp sees them."""
    e = 256
    logits = torch.randn(11, e)
    logits[0] = 0.0  # all tied: the fallback's argmax rounds
    logits[1] = torch.arange(e) % 4  # four-way ties at each value
    logits[2, 10:20] = 5.0  # ten tied maxima
    logits[3] = torch.arange(e).flip(0) // 8  # ties inside each group
    logits[4] = float("nan")  # all NaN: counts as all -inf
    logits[5] = float("-inf")
    logits[6, [3, 200]] = float("inf")
    logits[7, ::2] = float("nan")
    logits[8, 100:] = float("-inf")
    logits = logits.repeat(QUAD_MIN_TOKENS // 11 + 1, 1)  # 1034 tokens
    w, ids, counts = run_router(logits.cuda(), k, None, config)
    _, ref_ids, _ = reference.router(logits, k, **config)
    assert torch.equal(ids.cpu(), ref_ids), f"{config}: {ids.cpu().tolist()} vs {ref_ids.tolist()}"
    assert_router_matches_reference(logits, w, ids, k, **config)
    assert all(len(set(r)) == k for r in ids.tolist())
    assert torch.equal(counts.cpu(), torch.bincount(ids.cpu().long().flatten(), minlength=e).int())


@requires_sm90
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_nan_and_inf_rows(score_func):
    e, k = 32, 4
    logits = torch.randn(6, e)
    logits[0, 3] = float("nan")
    logits[1] = float("nan")  # all NaN: counts as all -inf
    logits[2] = float("-inf")
    logits[3, 5] = float("inf")
    logits[4, [1, 7]] = float("inf")
    logits[5, ::2] = float("-inf")
    w, ids, counts = run_router(logits.cuda(), k, None, dict(score_func=score_func))
    _, ref_ids, _ = reference.router(logits, k, score_func=score_func)
    assert torch.equal(ids.cpu(), ref_ids), f"{ids.cpu().tolist()} vs {ref_ids.tolist()}"
    assert_router_matches_reference(logits, w, ids, k, score_func=score_func)
    assert ((ids >= 0) & (ids < e)).all() and all(len(set(r)) == k for r in ids.tolist())
    assert int(counts.sum()) == 6 * k


@requires_sm90
def test_k_equals_e():
    logits = torch.randn(5, 16)
    w, ids, _ = run_router(logits.cuda(), 16, None, dict(score_func="sigmoid"))
    assert (ids.cpu().sort(-1).values == torch.arange(16)).all()
    assert_router_matches_reference(logits, w, ids, 16, score_func="sigmoid")


@requires_sm90
@pytest.mark.parametrize(
    "e, k, config",
    [
        (256, 8, PRESETS["deepseek_v3"].router_kwargs()),
        (160, 6, PRESETS["deepseek_v2"].router_kwargs()),
        (128, 8, PRESETS["qwen3_moe"].router_kwargs()),
        (384, 8, PRESETS["kimi_k2"].router_kwargs()),
        (72, 6, dict(num_groups=8, topk_groups=3, renormalize=False)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_cuda(e, k, config, dtype, gen):
    logits, bias = make_inputs(500, e, gen, dtype, "cuda", with_bias=True)
    logits.requires_grad_(True)
    out = moe_kernels.router(logits, k, bias=bias, **config)
    grad_out = torch.randn(out.weights.shape, generator=gen).cuda()
    (grad,) = torch.autograd.grad(out.weights, logits, grad_out)
    # Reference autograd in float64 through the same ids (selection held fixed).
    lg = logits.detach().cpu().double().requires_grad_(True)
    scores = torch.softmax(lg, -1) if config.get("score_func", "softmax") == "softmax" else torch.sigmoid(lg)
    w = scores.gather(1, out.ids.cpu().long())
    if config.get("renormalize", True):
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    (grad_ref,) = torch.autograd.grad(w * config.get("scaling_factor", 1.0), lg, grad_out.cpu().double())
    assert grad.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, **tol, msg=lambda m: f"{e=} {k=} {dtype=}: {m}")


@requires_sm90
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "num_devices, seq_lens", [(0, None), (8, None), (0, [100, 0, 377, 1, 22]), (4, [250, 250])]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balance_loss_cuda(score_func, num_devices, seq_lens, dtype, gen):
    e, k, t = 64, 6, 500
    logits = (torch.randn(t, e, generator=gen) * 2).to(dtype)
    ids = reference.router(logits, k, score_func=score_func)[1]
    offsets = None
    if seq_lens is not None:
        offsets = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    lg = logits.cuda().requires_grad_(True)
    loss = moe_kernels.balance_loss(
        lg, ids.cuda(), score_func=score_func, alpha=0.01, num_devices=num_devices, seq_offsets=offsets
    )
    (grad,) = torch.autograd.grad(loss * 3.0, lg)
    lg_ref = logits.double().requires_grad_(True)
    ref = reference.balance_loss(
        lg_ref, ids, score_func=score_func, alpha=0.01, num_devices=num_devices, seq_lens=seq_lens
    )
    (grad_ref,) = torch.autograd.grad(ref * 3.0, lg_ref)
    case = f"{score_func=} {num_devices=} {seq_lens=} {dtype=}"
    torch.testing.assert_close(
        loss.cpu().double(), ref.detach().double(), rtol=1e-5, atol=1e-8, msg=lambda m: f"{case}: {m}"
    )
    tol = dict(rtol=1e-4, atol=1e-9) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-8)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, **tol, msg=lambda m: f"{case}: {m}")


@requires_sm90
def test_balance_loss_deterministic_and_empty(gen):
    logits = torch.randn(100_000, 256, generator=gen).cuda()
    ids = moe_kernels.router(logits, 8, score_func="sigmoid").ids
    losses = [moe_kernels.balance_loss(logits, ids, score_func="sigmoid") for _ in range(3)]
    assert all(torch.equal(losses[0], x) for x in losses), [x.item() for x in losses]
    empty = moe_kernels.balance_loss(logits[:0], ids[:0], score_func="sigmoid")
    assert empty.item() == 0.0


@requires_sm90
@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64])
def test_update_expert_bias_exact(counts_dtype, gen):
    for e in (8, 256, 384, 2048):
        bias = torch.randn(e, generator=gen)
        counts = torch.randint(0, 1000, (e,), generator=gen).to(counts_dtype)
        counts[: e // 8] = counts[e // 8]  # some counts equal the others exactly
        counts[-1] = int(counts.sum() - counts[-1]) // (e - 1)  # and maybe the mean
        expected = reference.update_expert_bias(bias.clone(), counts, 1e-3)
        got = moe_kernels.update_expert_bias_(bias.cuda(), counts.cuda(), 1e-3)
        assert torch.equal(got.cpu(), expected), f"{e=} {counts_dtype=}"


@requires_sm90
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@requires_sm90
def test_compile_fullgraph_cuda(gen):
    logits, bias = make_inputs(64, PRESETS["deepseek_v3"], gen, device="cuda")
    logits.requires_grad_(True)

    def fn(logits, bias):
        out = moe_kernels.router_preset(logits, "deepseek_v3", bias=bias)
        return (out.weights * torch.arange(8, device=logits.device)).sum(), out.ids

    loss_c, ids_c = torch.compile(fn, fullgraph=True)(logits, bias)
    loss_e, ids_e = fn(logits, bias)
    assert torch.equal(ids_c, ids_e)
    torch.testing.assert_close(loss_c, loss_e)
    g_c = torch.autograd.grad(loss_c, logits)[0]
    g_e = torch.autograd.grad(loss_e, logits)[0]
    torch.testing.assert_close(g_c, g_e)


@requires_sm90
def test_cuda_graph_capture(gen):
    preset = PRESETS["deepseek_v3"]
    logits, bias = make_inputs(128, preset, gen, device="cuda")
    run = lambda: moe_kernels.router_preset(logits, preset, bias=bias, return_counts=True)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    new_logits, _ = make_inputs(128, preset, gen, device="cuda")
    logits.copy_(new_logits)
    graph.replay()
    check = run()
    assert torch.equal(out.ids, check.ids) and torch.equal(out.counts, check.counts)
    assert_router_matches_reference(logits, out.weights, out.ids, 8, bias=bias, **preset.router_kwargs())
