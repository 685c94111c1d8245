"""Permute / unpermute: schemas, fake kernels, CPU path, errors and autograd everywhere; the CUDA
kernels on Hopper.

Data movement is bit-exact against moe_kernels.reference: expert_offsets, row_map, the rows below
expert_offsets[-1] (padding rows included) and their FP8 scales. Rows at or past expert_offsets[-1]
are unspecified (the kernel leaves them unwritten) and are never compared. unpermute is bit-exact
too (fp32 sum in k order, no FMA). Every output is poisoned (NaN bytes) before the kernel runs.
"""

import pytest
import torch
from conftest import requires_sm90

import moe_kernels
from moe_kernels import reference
from moe_kernels.testing import assert_bitwise_equal, poison_allocator_

FP8 = torch.float8_e4m3fn

# hidden, experts, top_k
MODELS = {"deepseek_v3": (7168, 256, 8), "qwen3": (2048, 128, 8), "mixtral": (4096, 8, 2)}
ALIGNMENTS = (1, 16, 64, 128)


def router_ids(tokens, experts, top_k, gen, dtype=torch.int32, drop=0.0):
    """K distinct experts per token, as a router picks them; a fraction `drop` of pairs set to -1."""
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    if drop:
        ids[torch.rand(tokens, top_k, generator=gen) < drop] = -1
    return ids.to(dtype)


def random_rows(tokens, hidden, dtype, gen):
    """Rows with magnitudes spread over many binades (so FP8 scales differ per group)."""
    x = torch.randn(tokens, hidden, generator=gen)
    if hidden % 128 == 0 and tokens:
        x = x * torch.exp2(
            torch.randint(-12, 12, (tokens, hidden // 128, 1), generator=gen)
        ).repeat_interleave(128, -1).reshape(tokens, hidden)
    return x.to(dtype)


def with_special_values(x):
    """NaN, +-inf, an all-zero group and a group with no finite value, where the shape allows."""
    x = x.clone()
    if x.shape[0] >= 4 and x.shape[1] >= 256:
        x[0, 5] = float("nan")
        x[1, 7] = float("inf")
        x[1, 9] = float("-inf")
        x[2, :128] = 0
        x[3, 128:256] = float("inf")
    return x


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_input(mode, tokens, hidden, gen):
    """(x, x_scales, permute kwargs) for a mode: bf16 / fp16 / fp32 rows, e4m3 rows with scales, or
    rows quantised by permute: "quantize" (bf16), "quantize_pow2" (power-of-two scales),
    "quantize_fp16", "quantize_fp32"."""
    if mode in DTYPES:
        return random_rows(tokens, hidden, DTYPES[mode], gen), None, {}
    dtype = (
        DTYPES[mode.removeprefix("quantize_")]
        if mode in ("quantize_fp16", "quantize_fp32")
        else torch.bfloat16
    )
    x = with_special_values(random_rows(tokens, hidden, dtype, gen))
    if mode == "fp8_in":
        q, s = reference.quantize_fp8(x)
        return q, s, {}
    return x, None, {"quantize": True, "pow2_scale": mode == "quantize_pow2"}


def assert_permute_equal(result, ref, case):
    """Bit-exact comparison of a CUDA permute result with reference.permute's, on the rows in use."""
    out, scales, offsets, row_map = ref
    assert_bitwise_equal(result.expert_offsets.cpu(), offsets, f"{case}: expert_offsets")
    assert_bitwise_equal(result.row_map.cpu(), row_map, f"{case}: row_map")
    assert result.out.shape == out.shape and result.out.dtype == out.dtype, case
    used = int(offsets[-1])
    assert_bitwise_equal(result.out[:used].cpu(), out[:used], f"{case}: out rows")
    if scales is None:
        assert result.out_scales is None, case
    else:
        assert result.out_scales.shape == scales.shape, case
        assert_bitwise_equal(result.out_scales[:used].cpu(), scales[:used], f"{case}: out_scales")


def permute_cuda(x, ids, num_experts, x_scales=None, **kwargs):
    """moe_kernels.permute on the GPU with poisoned outputs; the inputs are CPU tensors."""
    x_cuda, ids_cuda = x.cuda(), ids.cuda()
    scales_cuda = x_scales.cuda() if x_scales is not None else None
    poison_allocator_()
    return moe_kernels.permute(x_cuda, ids_cuda, num_experts, x_scales=scales_cuda, **kwargs)


def check_permute(x, ids, num_experts, case, x_scales=None, **kwargs):
    ref = reference.permute(x, ids, num_experts, x_scales=x_scales, **kwargs)
    result = permute_cuda(x, ids, num_experts, x_scales=x_scales, **kwargs)
    assert_permute_equal(result, ref, case)
    return result, ref


@pytest.fixture(autouse=True)
def no_device_errors():
    """Every test starts and ends with a clean device-error flag: a spurious flag fails the test."""
    moe_kernels.check_device_errors()
    yield
    moe_kernels.check_device_errors()


# ------------------------------------------------------------------------------------------------
# Everywhere (CPU): schemas, fake kernels, the CPU implementation, errors, autograd
# ------------------------------------------------------------------------------------------------


def test_schemas_registered():
    for name in ("permute", "unpermute", "unpermute_backward", "device_error_code", "clear_device_error"):
        assert hasattr(torch.ops.moe_kernels, name), name
    schema = str(torch.ops.moe_kernels.permute.default._schema)
    assert "Tensor? x_scales, Tensor expert_ids, int num_experts, int first_expert" in schema, schema
    assert "-> (Tensor, Tensor, Tensor, Tensor)" in schema, schema
    schema = str(torch.ops.moe_kernels.unpermute.default._schema)
    assert "Tensor y, Tensor row_map, Tensor? weights, Tensor? shared_output) -> Tensor" in schema, schema


def test_exports():
    for name in ("permute", "unpermute", "PermuteResult", "check_device_errors"):
        assert name in moe_kernels.__all__ and hasattr(moe_kernels, name), name


@pytest.mark.parametrize("mode", ["bf16", "fp32", "fp8_in", "quantize", "quantize_pow2", "quantize_fp32"])
@pytest.mark.parametrize("align", ALIGNMENTS)
def test_cpu_path_matches_reference(mode, align, gen):
    x, x_scales, kwargs = make_input(mode, 40, 256, gen)
    ids = router_ids(40, 16, 4, gen, drop=0.2)
    result = moe_kernels.permute(x, ids, 16, align=align, x_scales=x_scales, **kwargs)
    ref = reference.permute(x, ids, 16, align=align, x_scales=x_scales, **kwargs)
    assert isinstance(result, moe_kernels.PermuteResult)
    case = f"{mode=} {align=}"
    for got, want, name in zip(result, ref, ("out", "out_scales", "expert_offsets", "row_map"), strict=True):
        if want is None:
            assert got is None, f"{case}: {name}"
        else:
            assert_bitwise_equal(got, want, f"{case}: {name}")
    weights = torch.rand(40, 4, generator=gen)
    y = (
        result.out.float()
        if result.out.dtype != FP8
        else reference.dequantize_fp8(result.out, result.out_scales)
    )
    assert_bitwise_equal(
        moe_kernels.unpermute(y, result.row_map, weights),
        reference.unpermute(y, result.row_map, weights),
        case,
    )


def test_cpu_local_expert_range(gen):
    x = random_rows(30, 64, torch.bfloat16, gen)
    ids = router_ids(30, 32, 4, gen, dtype=torch.int64)
    result = moe_kernels.permute(x, ids, 32, first_expert=8, num_local_experts=8, align=16)
    ref = reference.permute(x, ids, 32, first_expert=8, num_local_experts=8, align=16)
    assert result.expert_offsets.shape == (9,)
    assert_bitwise_equal(result.row_map, ref[3], "row_map")
    assert_bitwise_equal(result.out, ref[0], "out")


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16)
        ids = torch.empty(5, 4, dtype=torch.int64)
        r = moe_kernels.permute(x, ids, 64, align=16)
        assert (
            r.out.shape == (5 * 4 + 64 * 15, 256) and r.out.dtype == torch.bfloat16 and r.out_scales is None
        )
        assert r.expert_offsets.shape == (65,) and r.expert_offsets.dtype == torch.int32
        assert r.row_map.shape == (5, 4) and r.row_map.dtype == torch.int32
        r = moe_kernels.permute(
            x, ids, 64, quantize=True, num_out_rows=33, first_expert=32, num_local_experts=16
        )
        assert r.out.shape == (33, 256) and r.out.dtype == FP8
        assert r.out_scales.shape == (33, 2) and r.out_scales.dtype == torch.float32
        assert r.expert_offsets.shape == (17,)
        q = torch.empty(5, 256, dtype=FP8)
        r = moe_kernels.permute(q, ids, 64, x_scales=torch.empty(5, 2))
        assert r.out.dtype == FP8 and r.out_scales.shape == (20, 2)
        out = moe_kernels.unpermute(torch.empty(20, 256, dtype=torch.float16), r.row_map, torch.empty(5, 4))
        assert out.shape == (5, 256) and out.dtype == torch.float16
        grad_y, grad_w = torch.ops.moe_kernels.unpermute_backward(
            torch.empty(5, 256), r.row_map, None, torch.empty(20, 256), 20
        )
        assert grad_y.shape == (20, 256) and grad_w.shape == (5, 4) and grad_w.dtype == torch.float32
        _, grad_w = torch.ops.moe_kernels.unpermute_backward(torch.empty(5, 256), r.row_map, None, None, 20)
        assert grad_w.shape == (0,)


def bad_calls(device):
    """(function, args, kwargs, message) of bad calls; the CPU path, the fake kernels and the CUDA
    launchers give the same message."""

    def z(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    bf16, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    x, ids = z(4, 256, dtype=bf16), z(4, 2, dtype=i32)
    p, u = moe_kernels.permute, moe_kernels.unpermute
    return [
        (
            p,
            (z(2, 4, 8, dtype=bf16), ids, 8),
            {},
            "permute: x must be 2-D [tokens, hidden], got shape [2, 4, 8]",
        ),
        (p, (x, z(4, dtype=i32), 8), {}, "permute: expert_ids must be 2-D [tokens, top_k], got shape [4]"),
        (
            p,
            (z(4, 256, dtype=i32), ids, 8),
            {},
            "x must be bfloat16 or float16 or float32 or float8_e4m3fn, got int32",
        ),
        (p, (x, z(4, 2), 8), {}, "permute: expert_ids must be int32 or int64, got float32"),
        (p, (x, z(3, 2, dtype=i64), 8), {}, "permute: expert_ids has 3 rows, x has 4"),
        (
            p,
            (x, z(4, 33, dtype=i32), 64),
            {},
            "permute: top_k (expert_ids.shape[1]) must be in [1, 32], got 33",
        ),
        (p, (x, ids, 8), {"align": 32}, "permute: align must be one of (1, 16, 64, 128), got 32"),
        (
            p,
            (x, ids, 256),
            {"first_expert": 250, "num_local_experts": 10},
            "local experts [first_expert, first_expert + num_local_experts) = [250, 260) must lie in "
            "[0, num_experts=256) and hold 1 to 1024 experts",
        ),
        (p, (x, ids, 2048), {}, "[0, 2048) must lie in [0, num_experts=2048) and hold 1 to 1024 experts"),
        (p, (x, ids, 8), {"first_expert": 8}, "[8, 8) must lie in [0, num_experts=8)"),
        (p, (z(4, 100, dtype=bf16), ids, 8), {"quantize": True}, "x's channels must be a multiple of 128"),
        (
            p,
            (z(4, 12, dtype=bf16), ids, 8),
            {},
            "x's rows must be a multiple of 16 bytes (hidden a multiple of 8",
        ),
        (
            p,
            (z(4, 256, dtype=FP8), ids, 8),
            {},
            "permute: x is float8_e4m3fn: pass its 1x128 scales as x_scales",
        ),
        (
            p,
            (z(4, 256, dtype=FP8), ids, 8),
            {"x_scales": z(4, 2), "quantize": True},
            "quantize must be False",
        ),
        (
            p,
            (z(4, 256, dtype=FP8), ids, 8),
            {"x_scales": z(4, 3)},
            "x_scales must be float32 [tokens, hidden/128]",
        ),
        (
            p,
            (x, ids, 8),
            {"x_scales": z(4, 2)},
            "permute: x_scales is only for float8_e4m3fn x, got x bfloat16",
        ),
        (p, (x, ids, 8), {"num_out_rows": -1}, "permute: num_out_rows must be in [0, 2^31), got -1"),
        (u, (z(8, 256, dtype=bf16), z(4, 2, dtype=i64)), {}, "unpermute: row_map must be int32, got int64"),
        (
            u,
            (z(8, 256, dtype=i32), ids),
            {},
            "unpermute: y must be bfloat16 or float16 or float32, got int32",
        ),
        (u, (z(8, 12, dtype=bf16), ids), {}, "unpermute: y's rows must be a multiple of 16 bytes"),
        (u, (z(8, 256, dtype=bf16), z(4, dtype=i32)), {}, "unpermute: row_map must be 2-D [tokens, top_k]"),
        (
            u,
            (z(8, 256), ids, z(4, 3)),
            {},
            "unpermute: weights must be [tokens, top_k] = [4, 2] like row_map",
        ),
        (
            u,
            (z(8, 256), ids, z(4, 2, dtype=i32)),
            {},
            "unpermute: weights must be bfloat16 or float16 or float32",
        ),
        (
            u,
            (z(8, 256), ids),
            {"shared_output": z(4, 128)},
            "shared_output must be [tokens, hidden] = [4, 256]",
        ),
        (
            u,
            (z(8, 256), ids),
            {"shared_output": z(4, 256, dtype=bf16)},
            "shared_output must be float32 like y",
        ),
    ]


def _expect_value_error(fn, args, kwargs, message):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert message in str(info.value), f"expected {message!r} in {str(info.value)!r}"


@pytest.mark.parametrize("case", range(len(bad_calls("cpu"))))
def test_bad_arguments_raise_clear_errors(case):
    _expect_value_error(*bad_calls("cpu")[case])


def test_bad_arguments_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for fn, args, kwargs, message in bad_calls("cpu"):
            _expect_value_error(fn, args, kwargs, message)


def test_cpu_path_raises_on_bad_ids_and_too_few_rows(gen):
    x = random_rows(4, 64, torch.bfloat16, gen)
    with pytest.raises(ValueError, match=r"expert_ids must be in \[-1, 8\)"):
        moe_kernels.permute(x, torch.tensor([[0, 1], [2, 8], [0, 1], [3, 4]]), 8)
    with pytest.raises(ValueError, match="num_out_rows=5 is smaller than the 8 rows"):
        moe_kernels.permute(x, torch.tensor([[0, 1], [2, 3], [0, 1], [3, 4]]), 8, num_out_rows=5)


def test_device_error_flag_starts_clear():
    assert torch.ops.moe_kernels.device_error_code() == 0
    torch.ops.moe_kernels.clear_device_error()
    moe_kernels.check_device_errors()


def test_quantize_is_not_differentiable(gen):
    x = random_rows(4, 128, torch.bfloat16, gen).requires_grad_()
    with pytest.raises(ValueError, match="FP8 outputs are not differentiable"):
        moe_kernels.permute(x, router_ids(4, 8, 2, gen), 8, quantize=True)


@pytest.mark.filterwarnings("ignore:Input #.* requires gradient and is not a double")
def test_gradcheck_cpu(gen):
    # The ops take fp32 at most; both are linear in each input, so fp32 finite differences are
    # accurate to ~1e-4 and a 1e-3 tolerance still catches a wrong or missing term.
    ids = router_ids(5, 6, 2, gen, drop=0.2)
    x = torch.randn(5, 8, generator=gen).requires_grad_()
    tol = {"eps": 1e-3, "atol": 1e-3, "rtol": 1e-3}
    assert torch.autograd.gradcheck(lambda x: moe_kernels.permute(x, ids, 6, align=16).out, (x,), **tol)
    row_map = moe_kernels.permute(x.detach(), ids, 6, align=16).row_map
    y = torch.randn(5 * 2 + 6 * 15, 8, generator=gen).requires_grad_()
    w = torch.rand(5, 2, generator=gen).requires_grad_()
    s = torch.randn(5, 8, generator=gen).requires_grad_()
    fn = lambda y, w, s: moe_kernels.unpermute(y, row_map, w, shared_output=s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, w, s), **tol)
    assert torch.autograd.gradcheck(lambda y: moe_kernels.unpermute(y, row_map), (y,), **tol)


def test_autograd_cpu_matches_reference_autograd(gen):
    ids = router_ids(12, 8, 3, gen, drop=0.2)
    x = torch.randn(12, 16, generator=gen, requires_grad=True)
    out = moe_kernels.permute(x, ids, 8, align=16).out
    x_ref = x.detach().clone().requires_grad_()
    out_ref, _, _, row_map = reference.permute(x_ref, ids, 8, align=16)
    g = torch.randn(out.shape, generator=gen)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(out_ref, x_ref, g)
    torch.testing.assert_close(grad, grad_ref)

    y = torch.randn(out.shape, generator=gen, requires_grad=True)
    w = torch.rand(12, 3, generator=gen, requires_grad=True)
    s = torch.randn(12, 16, generator=gen, requires_grad=True)
    g = torch.randn(12, 16, generator=gen)
    grads = torch.autograd.grad(moe_kernels.unpermute(y, row_map, w, shared_output=s), (y, w, s), g)
    leaves = [t.detach().clone().requires_grad_() for t in (y, w, s)]
    grads_ref = torch.autograd.grad(
        reference.unpermute(leaves[0], row_map, leaves[1], shared_output=leaves[2]), leaves, g
    )
    for got, want, name in zip(grads, grads_ref, ("y", "weights", "shared_output"), strict=True):
        torch.testing.assert_close(got, want, msg=f"grad of {name}")


def test_reference_unpermute_backward_matches_autograd(gen):
    row_map = torch.tensor([[0, 3], [-1, 1], [2, -1]], dtype=torch.int32)
    y = torch.randn(5, 8, generator=gen, requires_grad=True)
    w = torch.rand(3, 2, generator=gen, requires_grad=True)
    g = torch.randn(3, 8, generator=gen)
    grad_y, grad_w = torch.autograd.grad(reference.unpermute(y, row_map, w), (y, w), g)
    ref_y, ref_w = reference.unpermute_backward(g, row_map, w.detach(), y.detach(), 5)
    torch.testing.assert_close(ref_y, grad_y, rtol=0, atol=0)
    torch.testing.assert_close(ref_w, grad_w)
    assert ref_w[1, 0] == 0 and ref_w[2, 1] == 0 and (ref_y[4] == 0).all()


# opcheck's test_schema compares inputs before and after with arithmetic torch lacks for float8, so
# ops with FP8 inputs or outputs run the other checks (see tests/test_quant.py).
OPCHECK_FP8 = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_all(device, gen):
    """opcheck every op on `device`, with num_out_rows exact so that every output row is written."""
    ids = router_ids(24, 16, 4, gen, drop=0.1)
    x = random_rows(24, 256, torch.bfloat16, gen)
    op = torch.ops.moe_kernels.permute.default
    for align, id_dtype in [(1, torch.int64), (16, torch.int32), (128, torch.int64)]:
        rows = int(reference.permute(x, ids, 16, align=align)[2][-1])
        args = (
            x.to(device, copy=True).requires_grad_(),
            None,
            ids.to(id_dtype).to(device),
            16,
            0,
            16,
            align,
            False,
            False,
            rows,
        )
        torch.library.opcheck(op, args)
    local_rows = int(reference.permute(x, ids, 16, first_expert=4, num_local_experts=8)[2][-1])
    torch.library.opcheck(op, (x.to(device), None, ids.to(device), 16, 4, 8, 1, False, False, local_rows))
    rows = int(reference.permute(x, ids, 16, align=16)[2][-1])
    q, s = reference.quantize_fp8(x)
    for args in [
        (x.to(device), None, ids.to(device), 16, 0, 16, 16, True, True, rows),
        (q.to(device), s.to(device), ids.to(device), 16, 0, 16, 16, False, False, rows),
    ]:
        torch.library.opcheck(op, args, test_utils=OPCHECK_FP8)

    row_map = reference.permute(x, ids, 16, align=16)[3].to(device)
    y = torch.randn(rows, 256, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = torch.rand(24, 4, generator=gen).to(device).requires_grad_()
    s = torch.randn(24, 256, generator=gen).to(device, torch.bfloat16).requires_grad_()
    op = torch.ops.moe_kernels.unpermute.default
    for args in [(y, row_map, None, None), (y, row_map, w, None), (y, row_map, w, s)]:
        torch.library.opcheck(op, args)
    g = torch.randn(24, 256, generator=gen).to(device, torch.bfloat16)
    op = torch.ops.moe_kernels.unpermute_backward.default
    for args in [(g, row_map, w.detach(), y.detach(), rows), (g, row_map, None, None, rows)]:
        torch.library.opcheck(op, args)


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


def _moe_step(x, ids, weights, shared):
    """permute -> a stand-in expert -> unpermute, as an MoE layer chains them."""
    r = moe_kernels.permute(x, ids, 16, align=16)
    return moe_kernels.unpermute(r.out * 2, r.row_map, weights, shared_output=shared)


def test_compile_fullgraph_cpu(gen):
    x = random_rows(9, 256, torch.bfloat16, gen)
    ids, w = router_ids(9, 16, 4, gen), torch.rand(9, 4, generator=gen)
    compiled = torch.compile(_moe_step, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(compiled(x, ids, w, x), _moe_step(x, ids, w, x), "compiled")


# ------------------------------------------------------------------------------------------------
# Hopper: the CUDA kernels, bit-exact against the reference
# ------------------------------------------------------------------------------------------------


@requires_sm90
@pytest.mark.parametrize("mode", ["bf16", "fp8_in", "quantize", "quantize_pow2"])
@pytest.mark.parametrize("align", ALIGNMENTS)
@pytest.mark.parametrize("tokens", [1, 1100])
@pytest.mark.parametrize("model", list(MODELS))
def test_permute_cuda_models(model, tokens, align, mode, gen):
    """Model shapes; 1100 tokens span 3 ranking chunks at K = 8."""
    hidden, experts, top_k = MODELS[model]
    x, x_scales, kwargs = make_input(mode, tokens, hidden, gen)
    ids = router_ids(tokens, experts, top_k, gen)
    check_permute(x, ids, experts, f"{model=} {tokens=} {align=} {mode=}", x_scales, align=align, **kwargs)


@requires_sm90
@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp32", "fp8_in", "quantize"])
@pytest.mark.parametrize("align", ALIGNMENTS)
def test_permute_cuda_no_tokens(mode, align, gen):
    x, x_scales, kwargs = make_input(mode, 0, 256, gen)
    ids = torch.empty(0, 8, dtype=torch.int32)
    result, _ = check_permute(x, ids, 64, f"{mode=} {align=}", x_scales, align=align, **kwargs)
    assert (result.expert_offsets == 0).all() and result.row_map.shape == (0, 8)
    assert result.out.shape == (64 * (align - 1), 256)


@requires_sm90
@pytest.mark.parametrize(
    "mode", ["bf16", "fp16", "fp32", "fp8_in", "quantize", "quantize_pow2", "quantize_fp16", "quantize_fp32"]
)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_cuda_dtypes_and_drops(mode, id_dtype, gen):
    """Every input dtype, both id dtypes, 30% of the pairs dropped (-1)."""
    x, x_scales, kwargs = make_input(mode, 700, 1024, gen)
    ids = router_ids(700, 64, 6, gen, dtype=id_dtype, drop=0.3)
    for align in ALIGNMENTS:
        check_permute(x, ids, 64, f"{mode=} {id_dtype=} {align=}", x_scales, align=align, **kwargs)


@requires_sm90
@pytest.mark.parametrize("align", ALIGNMENTS)
def test_permute_cuda_skewed_routing(align, gen):
    """Empty experts, all tokens on one expert (one shared counter for every lane), one expert in
    total, and many chunks with few or many experts (the scan's slices)."""
    x = random_rows(5000, 64, torch.bfloat16, gen)
    cases = {
        "all on expert 5, K=1": (torch.full((5000, 1), 5), 64),
        "column 0 on expert 3": (
            torch.cat([torch.full((5000, 1), 3), router_ids(5000, 64, 4, gen)[:, 1:]], 1),
            64,
        ),
        "only experts 0, 7, 63": (
            torch.tensor([0, 7, 63])[torch.randint(0, 3, (5000, 2), generator=gen)],
            64,
        ),
        "one expert": (torch.zeros(5000, 1, dtype=torch.int64), 1),
        "1000 experts": (router_ids(5000, 1000, 3, gen), 1000),
        "300 experts, K=32": (router_ids(5000, 300, 32, gen), 300),
    }
    for name, (ids, experts) in cases.items():
        check_permute(x, ids.to(torch.int32), experts, f"{name} {align=}", align=align)


@requires_sm90
@pytest.mark.parametrize("tokens", [8191, 8192, 8193])
def test_permute_cuda_chunk_sizes(tokens, gen):
    """Up to 65536 pairs the index kernels take chunks of 1024 pairs (4 per thread), above it 4096
    (16 per thread): both sides of the switch, with K = 8 and 7 (chunks of whole tokens)."""
    x = random_rows(tokens, 64, torch.bfloat16, gen)
    for top_k in (8, 7):
        ids = router_ids(tokens, 256, top_k, gen, drop=0.1).to(torch.int32)
        check_permute(x, ids, 256, f"{tokens=} {top_k=}", align=16)


@requires_sm90
@pytest.mark.parametrize("mode", ["bf16", "quantize", "fp8_in"])
def test_permute_cuda_local_expert_range(mode, gen):
    """Expert-parallel ranks: each keeps its 32 of 256 experts; the others' pairs are dropped."""
    x, x_scales, kwargs = make_input(mode, 600, 7168, gen)
    ids = router_ids(600, 256, 8, gen, drop=0.05)
    for rank in (0, 3, 7):
        for align in (1, 128):
            case = f"{mode=} {rank=} {align=}"
            check_permute(
                x,
                ids,
                256,
                case,
                x_scales,
                align=align,
                first_expert=32 * rank,
                num_local_experts=32,
                **kwargs,
            )


@requires_sm90
def test_permute_cuda_input_views(gen):
    """Row-strided and misaligned views give the same bytes as contiguous inputs."""
    base = random_rows(301, 1024 + 128, torch.bfloat16, gen).cuda()
    ids = router_ids(300, 32, 4, gen)
    # the last view starts 6 bytes into a 16-byte vector: the launcher must copy it, not misread it
    views = [base[:300, :1024], base[:300, 128:], base.view(-1)[3 : 3 + 300 * 1024].view(300, 1024)]
    for view in views:
        for kwargs in ({}, {"quantize": True}):
            ref = reference.permute(view.cpu(), ids, 32, align=16, **kwargs)
            poison_allocator_()
            result = moe_kernels.permute(view, ids.cuda(), 32, align=16, **kwargs)
            assert_permute_equal(
                result, ref, f"view {tuple(view.stride())} +{view.storage_offset()} {kwargs}"
            )


@requires_sm90
def test_permute_cuda_exact_rows_and_determinism(gen):
    """num_out_rows = the rows in use fills every row; two runs give the same bytes."""
    for mode in ("bf16", "quantize"):
        x, _, kwargs = make_input(mode, 3000, 2048, gen)
        ids = router_ids(3000, 128, 8, gen, drop=0.1)
        for align in ALIGNMENTS:
            rows = int(reference.permute(x[:, :8], ids, 128, align=align)[2][-1])
            first, _ = check_permute(
                x, ids, 128, f"{mode=} {align=}", align=align, num_out_rows=rows, **kwargs
            )
            second = permute_cuda(x, ids, 128, align=align, num_out_rows=rows, **kwargs)
            for a, b, name in zip(
                first, second, ("out", "out_scales", "expert_offsets", "row_map"), strict=True
            ):
                if a is not None:
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (
                        f"{mode=} {align=}: {name} differs"
                    )


def unpermute_case(model, tokens, gen, align=16):
    """row_map of a routing with 20% drops, and y [R, H] with NaN in every row no pair maps to
    (padding and tail rows), so reading one would show."""
    hidden, experts, top_k = MODELS[model]
    ids = router_ids(tokens, experts, top_k, gen, drop=0.2)
    row_map = reference.permute(torch.zeros(tokens, 8), ids, experts, align=align)[3]
    rows = reference.permute_rows_bound(tokens * top_k, experts, align)
    unused = torch.ones(rows, dtype=torch.bool)
    unused[row_map[row_map >= 0].long()] = False
    return row_map, rows, hidden, unused


@requires_sm90
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("weights_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("model", list(MODELS))
def test_unpermute_cuda_bitexact(model, tokens, dtype, weights_dtype, shared, gen):
    row_map, rows, hidden, unused = unpermute_case(model, tokens, gen)
    y = torch.randn(rows, hidden, generator=gen).to(dtype)
    y[unused] = float("nan")
    weights = torch.rand(row_map.shape, generator=gen).to(weights_dtype) if weights_dtype else None
    shared_output = torch.randn(tokens, hidden, generator=gen).to(dtype) if shared else None
    ref = reference.unpermute(y, row_map, weights, shared_output=shared_output)
    cuda = lambda t: t.cuda() if t is not None else None  # noqa: E731
    poison_allocator_()
    out = moe_kernels.unpermute(cuda(y), cuda(row_map), cuda(weights), shared_output=cuda(shared_output))
    assert not torch.isnan(ref).any(), "the reference read a padding row"
    assert_bitwise_equal(out.cpu(), ref, f"{model=} {tokens=} {dtype=} {weights_dtype=} {shared=}")


@requires_sm90
def test_unpermute_cuda_no_tokens_and_views(gen):
    y = torch.randn(40, 512, generator=gen).to(torch.bfloat16).cuda()
    out = moe_kernels.unpermute(y, torch.empty(0, 8, dtype=torch.int32, device="cuda"))
    assert out.shape == (0, 512)
    row_map = torch.randint(-1, 40, (10, 4), generator=gen, dtype=torch.int32)
    base = torch.randn(41, 640, generator=gen).to(torch.bfloat16)
    for view in (base[:40, :512], base[:40, 128:], base.view(-1)[3 : 3 + 40 * 512].view(40, 512)):
        ref = reference.unpermute(view, row_map)
        out = moe_kernels.unpermute(view.cuda(), row_map.cuda())
        assert_bitwise_equal(out.cpu(), ref, f"view {tuple(view.stride())} +{view.storage_offset()}")


def float64_dots(y, g, row_map):
    """grad_weights computed in float64, and the scale of its rounding error (sum of |terms|)."""
    valid = row_map >= 0
    rows = y.double()[row_map.long().clamp_min(0)]
    terms = rows * g.double().unsqueeze(1)
    return (terms.sum(-1) * valid), (terms.abs().sum(-1) * valid)


@requires_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model", list(MODELS))
def test_gradients_cuda(model, dtype, gen):
    hidden, experts, top_k = MODELS[model]
    tokens = 200
    ids = router_ids(tokens, experts, top_k, gen, drop=0.1)
    case = f"{model=} {dtype=}"

    # permute: grad x = the unweighted unpermute of grad out (bit-exact), and the reference's autograd.
    x = random_rows(tokens, hidden, dtype, gen).cuda().requires_grad_()
    r = moe_kernels.permute(x, ids.cuda(), experts, align=16)
    grad_out = torch.randn(r.out.shape, generator=gen).to(dtype)
    (grad_x,) = torch.autograd.grad(r.out, x, grad_out.cuda())
    row_map = r.row_map.cpu()
    assert_bitwise_equal(grad_x.cpu(), reference.unpermute(grad_out, row_map), f"{case}: grad x")
    x_ref = x.detach().cpu().float().requires_grad_()
    (grad_ref,) = torch.autograd.grad(
        reference.permute(x_ref, ids, experts, align=16)[0], x_ref, grad_out.float()
    )
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 5e-2}  # bf16 rounding of a K-term sum
    torch.testing.assert_close(grad_x.cpu().float(), grad_ref, **tol, msg=f"{case}: grad x vs autograd")

    # unpermute: grad y bit-exact, grad weights against float64, grad shared = grad out.
    rows = r.out.shape[0]
    y = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = torch.rand(tokens, top_k, generator=gen)
    s = torch.randn(tokens, hidden, generator=gen).to(dtype)
    leaves = [t.cuda().requires_grad_() for t in (y, w, s)]
    out = moe_kernels.unpermute(leaves[0], r.row_map, leaves[1], shared_output=leaves[2])
    g = torch.randn(tokens, hidden, generator=gen).to(dtype)
    grad_y, grad_w, grad_s = (t.cpu() for t in torch.autograd.grad(out, leaves, g.cuda()))
    ref_y, _ = reference.unpermute_backward(g, row_map, w, y, rows)
    assert_bitwise_equal(grad_y, ref_y, f"{case}: grad y")
    assert_bitwise_equal(grad_s, g, f"{case}: grad shared_output")
    exact, scale = float64_dots(y, g, row_map)
    err = (grad_w.double() - exact).abs()
    assert (err <= 1e-4 * scale + 1e-30).all(), (
        f"{case}: grad weights off by {float((err / (scale + 1e-30)).max())}"
    )
    assert (grad_w[row_map < 0] == 0).all(), f"{case}: grad weights of dropped pairs"

    # Without weights: grad y is grad out copied to each pair's row.
    y_leaf = y.cuda().requires_grad_()
    (grad_y,) = torch.autograd.grad(moe_kernels.unpermute(y_leaf, r.row_map), y_leaf, g.cuda())
    assert_bitwise_equal(grad_y.cpu(), reference.unpermute_backward(g, row_map, None, None, rows)[0], case)


@requires_sm90
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@requires_sm90
def test_compile_fullgraph_cuda(gen):
    x = random_rows(64, 512, torch.bfloat16, gen).cuda()
    ids, w = router_ids(64, 16, 4, gen, drop=0.1).cuda(), torch.rand(64, 4, generator=gen).cuda()
    compiled = torch.compile(_moe_step, fullgraph=True)
    assert_bitwise_equal(compiled(x, ids, w, x).cpu(), _moe_step(x, ids, w, x).cpu(), "compiled")


@requires_sm90
@pytest.mark.parametrize("quantize", [False, True])
def test_cuda_graph_capture_and_replay(quantize, gen):
    """Capture permute + unpermute once; replay with new ids and rows; no host sync inside."""
    tokens, hidden, experts, top_k = 512, 1024, 32, 4
    x = random_rows(tokens, hidden, torch.bfloat16, gen).cuda()
    ids = router_ids(tokens, experts, top_k, gen).cuda()
    w = torch.rand(tokens, top_k, generator=gen).cuda()

    def step():
        r = moe_kernels.permute(x, ids, experts, align=16, quantize=quantize)
        y = r.out.float() if not quantize else r.out_scales.repeat_interleave(128, 1)
        return r, moe_kernels.unpermute(y, r.row_map, w)

    step()  # warm-up outside the graph (loads the kernels, allocates the error flag)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r, combined = step()
    for trial in range(3):
        x.copy_(random_rows(tokens, hidden, torch.bfloat16, gen))
        ids.copy_(router_ids(tokens, experts, top_k, gen, drop=0.1 * trial))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.permute(x.cpu(), ids.cpu(), experts, align=16, quantize=quantize)
        assert_permute_equal(r, ref, f"replay {trial} {quantize=}")
        y_ref = ref[0].float() if not quantize else ref[1].repeat_interleave(128, 1)
        assert_bitwise_equal(
            combined.cpu(), reference.unpermute(y_ref, ref[3], w.cpu()), f"replay {trial} combine"
        )


# ------------------------------------------------------------------------------------------------
# Hopper: errors found in device data (sticky device-error flag, no host sync)
# ------------------------------------------------------------------------------------------------


@requires_sm90
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_ids_out_of_range_are_dropped_and_reported(id_dtype, gen):
    x = random_rows(300, 512, torch.bfloat16, gen)
    ids = router_ids(300, 16, 4, gen).to(id_dtype)
    bad = ids.clone()
    bad[5, 1], bad[77, 0], bad[299, 3] = 16, -2, 1000 if id_dtype == torch.int32 else 1 << 40
    dropped = bad.clone()
    dropped[5, 1] = dropped[77, 0] = dropped[299, 3] = -1
    ref = reference.permute(x, dropped, 16, align=16)
    result = permute_cuda(x, bad, 16, align=16)  # does not raise: the error is found on the device
    torch.cuda.synchronize()
    assert_permute_equal(result, ref, "bad ids dropped")
    message = (
        r"permute: expert_ids had values outside \[-1, num_experts\).*\(detected on the device during an"
    )
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.permute(x.cuda(), ids.cuda(), 16)  # the next call reports it, without a sync
    moe_kernels.permute(x.cuda(), ids.cuda(), 16)  # reported once, then clear
    moe_kernels.permute(x.cuda(), bad.cuda(), 16)
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.check_device_errors()  # synchronises, then raises


class _DeviceBytes:
    """A uint8 view of raw device memory through __cuda_array_interface__ (it owns nothing)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 2,
        }


@requires_sm90
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("align", [1, 128])
def test_too_few_rows_are_dropped_reported_and_never_written_past(align, quantize, gen):
    """num_out_rows below what the routing needs: pairs that do not fit are dropped, offsets are
    clamped, the error is reported, and no byte past row R is written. `out` is carved from the
    start of a larger block filled with a canary, and the canary past R is checked."""
    tokens, hidden, experts, top_k = 600, 2048, 8, 2  # out > 1 MB: from the large pool, like the canary
    x = random_rows(tokens, hidden, torch.bfloat16, gen)
    ids = router_ids(tokens, experts, top_k, gen)
    ref_out, ref_scales, ref_offsets, ref_map = reference.permute(
        x, ids, experts, align=align, quantize=quantize
    )
    rows = int(ref_offsets[-1]) * 2 // 3
    out_bytes = rows * hidden * (1 if quantize else 2)
    block_bytes = out_bytes + (4 << 20)
    x_cuda, ids_cuda = x.cuda(), ids.cuda()
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        canary = torch.full((block_bytes,), 0x5A, dtype=torch.uint8, device="cuda")
        block = canary.data_ptr()
        del canary
        result = moe_kernels.permute(
            x_cuda, ids_cuda, experts, align=align, quantize=quantize, num_out_rows=rows
        )
    # Outside the pool again, so the comparison's own buffers cannot land in the canary.
    assert result.out.data_ptr() == block, "test setup: the allocator did not reuse the canary block"
    window = torch.as_tensor(_DeviceBytes(block, block_bytes), device="cuda")
    untouched = bool((window[out_bytes:] == 0x5A).all())
    del window
    with pytest.raises(
        RuntimeError, match=r"permute: num_out_rows was smaller than the rows the routing needs"
    ):
        moe_kernels.check_device_errors()
    assert untouched, "bytes past num_out_rows were written"

    case = f"{align=} {quantize=} {rows=}"
    offsets, row_map = result.expert_offsets.cpu(), result.row_map.cpu()
    assert_bitwise_equal(offsets, ref_offsets.clamp_max(rows), f"{case}: clamped offsets")
    fits = ref_map < rows
    assert_bitwise_equal(row_map, torch.where(fits, ref_map, -1), f"{case}: row_map")
    assert_bitwise_equal(result.out[:rows].cpu(), ref_out[:rows], f"{case}: rows below R")
    if quantize:
        assert_bitwise_equal(result.out_scales[:rows].cpu(), ref_scales[:rows], f"{case}: scales below R")
    del result


@requires_sm90
def test_unpermute_row_out_of_range_is_skipped_and_reported(gen):
    y = torch.randn(50, 256, generator=gen).to(torch.bfloat16)
    row_map = torch.randint(-1, 50, (20, 4), generator=gen, dtype=torch.int32)
    bad = row_map.clone()
    bad[3, 2] = 50
    skipped = bad.clone()
    skipped[3, 2] = -1
    out = moe_kernels.unpermute(y.cuda(), bad.cuda())
    torch.cuda.synchronize()
    assert_bitwise_equal(out.cpu(), reference.unpermute(y, skipped), "row past y skipped")
    with pytest.raises(RuntimeError, match=r"unpermute: row_map had rows >= the rows of y.*earlier call"):
        moe_kernels.unpermute(y.cuda(), row_map.cuda())


@requires_sm90
@pytest.mark.parametrize("case", range(len(bad_calls("cpu"))))
def test_bad_arguments_raise_clear_errors_cuda(case):
    _expect_value_error(*bad_calls("cuda")[case])
