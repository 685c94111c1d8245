"""FP8 quantisation: schemas, fake kernels and the CPU path everywhere; the CUDA kernels on Hopper.

The kernels are bit-exact with the reference (same fp32 amax, same correctly rounded amax/448 and
x/scale, same round-to-nearest-even e4m3 conversion with saturation), so every comparison is exact.
"""

import pytest
import torch
from conftest import requires_sm90

import moe_kernels
from moe_kernels import reference
from moe_kernels.testing import assert_bitwise_equal, poison_allocator_

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_activations(m, k, dtype, gen, device="cpu"):
    # Log-uniform magnitudes across groups so scales span many binades, some tiny, some huge.
    x = torch.randn(m, k, generator=gen) * torch.exp2(
        torch.randint(-20, 20, (m, k // 128, 1), generator=gen)
    ).repeat_interleave(128, -1).reshape(m, k)
    return x.to(dtype).to(device)


def with_special_values(x):
    x = x.clone()
    if x.shape[0] >= 4 and x.shape[1] >= 256:
        x[0, 5] = float("nan")
        x[1, 7] = float("inf")
        x[1, 9] = float("-inf")
        x[2, :128] = 0  # an all-zero group
        x[3, 128:256] = float("inf")  # a group with no finite value
    return x


# ------------------------------------------------------------------------------------------------
# Everywhere (CPU): schemas, fake kernels, the CPU implementation, errors
# ------------------------------------------------------------------------------------------------


def test_schemas_registered():
    for name in ("quantize_fp8", "quantize_fp8_weight", "dequantize_fp8", "nccl_version"):
        assert hasattr(torch.ops.moe_kernels, name), name
    assert "Tensor x, bool pow2_scale=False" in str(torch.ops.moe_kernels.quantize_fp8.default._schema)


def test_nccl_linked():
    major, minor, patch = moe_kernels.nccl_version()
    assert major == 2 and minor >= 18, (major, minor, patch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_path_matches_reference(dtype, gen):
    x = with_special_values(random_activations(6, 384, dtype, gen))
    q, s = moe_kernels.quantize_fp8(x)
    q_ref, s_ref = reference.quantize_fp8(x)
    assert_bitwise_equal(q, q_ref, f"{dtype=}")
    assert_bitwise_equal(s, s_ref, f"{dtype=}")


def test_reference_special_values(gen):
    x = with_special_values(random_activations(4, 256, torch.float32, gen))
    q, s = reference.quantize_fp8(x)
    assert torch.isnan(q[0, 5].float())
    assert q[1, 7].float() == 448 and q[1, 9].float() == -448
    assert s[2, 0] == 1 and (q[2, :128].float() == 0).all()
    assert s[3, 1] == 1 and (q[3, 128:256].float() == 448).all()
    assert torch.isfinite(s).all()


def test_reference_round_trip_error(gen):
    x = torch.randn(64, 1024, generator=gen)
    q, s = reference.quantize_fp8(x)
    back = reference.dequantize_fp8(q, s, torch.float32)
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4); below 2^-6 it is subnormal with spacing
    # 2^-9, so the absolute error there is at most half of scale * 2^-9.
    bound = x.abs() * 2**-4 + reference.expand_scales(s, x.shape) * 2**-10
    assert ((back - x).abs() <= bound).all()


def test_pow2_scales_are_powers_of_two(gen):
    x = random_activations(8, 512, torch.float32, gen)
    _, s = reference.quantize_fp8(x, pow2_scale=True)
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all()
    _, s_plain = reference.quantize_fp8(x)
    assert (s >= s_plain).all() and (s < 2 * s_plain).all()


@pytest.mark.parametrize(
    "fn, args, message",
    [
        (moe_kernels.quantize_fp8, (torch.zeros(4, 100),), "channels must be a multiple of 128"),
        (moe_kernels.quantize_fp8, (torch.zeros(2, 4, 128),), "x must be 2-D"),
        (moe_kernels.quantize_fp8, (torch.zeros(4, 128, dtype=torch.int32),), "x must be bfloat16"),
        (moe_kernels.quantize_fp8_weight, (torch.zeros(4, 100),), "K must be a multiple of 128"),
        (moe_kernels.quantize_fp8_weight, (torch.zeros(128),), "w must be [N, K] or [experts, N, K]"),
        (
            moe_kernels.dequantize_fp8,
            (torch.zeros(4, 256, dtype=FP8), torch.ones(4, 3)),
            "fit neither 1x128 nor 128x128",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(fn, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fn(*args)


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, s = torch.ops.moe_kernels.quantize_fp8(torch.empty(5, 256, dtype=torch.bfloat16))
        assert q.shape == (5, 256) and q.dtype == FP8 and s.shape == (5, 2) and s.dtype == torch.float32
        q, s = torch.ops.moe_kernels.quantize_fp8_weight(torch.empty(3, 200, 384))
        assert q.shape == (3, 200, 384) and s.shape == (3, 2, 3)
        out = torch.ops.moe_kernels.dequantize_fp8(q, s, torch.float16)
        assert out.shape == (3, 200, 384) and out.dtype == torch.float16


# opcheck's test_schema compares inputs before and after with arithmetic that torch does not
# implement for float8 tensors, so ops with FP8 inputs run the other checks, and the "inputs are not
# mutated" part of test_schema is checked here byte for byte.
OPCHECK_FP8_INPUTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_all(device, gen):
    x = torch.randn(7, 256, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(2, 130, 256, generator=gen).to(device)
    q, s = moe_kernels.quantize_fp8(x)
    qw, sw = moe_kernels.quantize_fp8_weight(w)
    for op, args in [
        (torch.ops.moe_kernels.quantize_fp8.default, (x, False)),
        (torch.ops.moe_kernels.quantize_fp8.default, (x, True)),
        (torch.ops.moe_kernels.quantize_fp8_weight.default, (w, False)),
    ]:
        torch.library.opcheck(op, args)
    for q_in, s_in, dtype in [(q, s, torch.bfloat16), (qw, sw, torch.float32)]:
        before = q_in.view(torch.uint8).clone(), s_in.clone()
        torch.library.opcheck(
            torch.ops.moe_kernels.dequantize_fp8.default, (q_in, s_in, dtype), test_utils=OPCHECK_FP8_INPUTS
        )
        assert torch.equal(q_in.view(torch.uint8), before[0]) and torch.equal(s_in, before[1]), (
            "inputs mutated"
        )


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


def test_compile_fullgraph_cpu(gen):
    x = torch.randn(9, 256, generator=gen, dtype=torch.bfloat16)

    def fn(x):
        q, s = moe_kernels.quantize_fp8(x)
        return moe_kernels.dequantize_fp8(q, s, out_dtype=torch.float32)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), fn(x))


# ------------------------------------------------------------------------------------------------
# Hopper: the CUDA kernels, bit-exact against the reference
# ------------------------------------------------------------------------------------------------

SHAPES = [(0, 128), (1, 128), (7, 384), (129, 7168), (1000, 2048), (4097, 256)]


@requires_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k", SHAPES)
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_quantize_fp8_cuda_bitexact(m, k, dtype, pow2_scale, gen):
    x = with_special_values(random_activations(m, k, dtype, gen))
    q_ref, s_ref = reference.quantize_fp8(x, pow2_scale)
    poison_allocator_()
    q, s = moe_kernels.quantize_fp8(x.cuda(), pow2_scale=pow2_scale)
    case = f"{m=} {k=} {dtype=} {pow2_scale=}"
    assert_bitwise_equal(s.cpu(), s_ref, case)
    assert_bitwise_equal(q.cpu(), q_ref, case)


@requires_sm90
def test_quantize_fp8_cuda_views(gen):
    """Row-strided and misaligned inputs give the same bytes as a contiguous copy."""
    base = random_activations(65, 1024 + 128, torch.bfloat16, gen, "cuda")
    for view in (base[:, :1024], base[:, 128:], base.view(-1)[8 : 8 + 64 * 1024].view(64, 1024)):
        q, s = moe_kernels.quantize_fp8(view)
        q_ref, s_ref = reference.quantize_fp8(view.cpu())
        assert_bitwise_equal(q.cpu(), q_ref, f"view {tuple(view.stride())} offset {view.storage_offset()}")
        assert_bitwise_equal(s.cpu(), s_ref, "scales")


@requires_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 128), (3, 200, 384), (1, 7168, 2048), (0, 128, 128), (4, 1, 128)])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_quantize_fp8_weight_cuda_bitexact(shape, dtype, pow2_scale, gen):
    w = torch.randn(*shape, generator=gen).to(dtype)
    if w.numel() > 300:
        w.view(-1)[17] = float("nan")
        w.view(-1)[300] = float("-inf")
    q_ref, s_ref = reference.quantize_fp8_weight(w, pow2_scale)
    poison_allocator_()
    q, s = moe_kernels.quantize_fp8_weight(w.cuda(), pow2_scale=pow2_scale)
    case = f"{shape=} {dtype=} {pow2_scale=}"
    assert_bitwise_equal(s.cpu(), s_ref, case)
    assert_bitwise_equal(q.cpu(), q_ref, case)


@requires_sm90
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
def test_dequantize_fp8_cuda_bitexact(out_dtype, weights, gen):
    if weights:
        q, s = reference.quantize_fp8_weight(torch.randn(3, 300, 512, generator=gen))
    else:
        q, s = reference.quantize_fp8(random_activations(77, 512, torch.float32, gen))
    ref = reference.dequantize_fp8(q, s, out_dtype)
    poison_allocator_()
    out = moe_kernels.dequantize_fp8(q.cuda(), s.cuda(), out_dtype=out_dtype)
    assert_bitwise_equal(out.cpu(), ref, f"{out_dtype=} {weights=}")


@requires_sm90
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@requires_sm90
def test_compile_fullgraph_cuda(gen):
    x = random_activations(33, 512, torch.bfloat16, gen, "cuda")

    def fn(x):
        q, s = moe_kernels.quantize_fp8(x)
        return moe_kernels.dequantize_fp8(q, s, out_dtype=torch.float32) * 2

    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(x), fn(x))


@requires_sm90
def test_cuda_graph_capture(gen):
    x = random_activations(64, 1024, torch.bfloat16, gen, "cuda")
    moe_kernels.quantize_fp8(x)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = moe_kernels.quantize_fp8(x)
    x.copy_(random_activations(64, 1024, torch.bfloat16, gen, "cuda"))
    graph.replay()
    q_ref, s_ref = reference.quantize_fp8(x.cpu())
    assert_bitwise_equal(q.cpu(), q_ref, "graph replay")
    assert_bitwise_equal(s.cpu(), s_ref, "graph replay scales")
