"""CUDA graphs and determinism (issue 14, parts 4 and 5).

Graphs (Hopper): the whole MoE forward (router, permute, expert MLP, unpermute, shared experts on
their side stream; bf16 and FP8) is captured once and replayed with new tokens copied into the
static input and new routing (new gate weights and expert bias, an expert whose load goes from 0 to
every token); each replay equals the eager forward bit for bit and the reference within DESIGN.md §6.

Determinism: every op, forward and backward, and the layer run twice on the same inputs give the
same bytes (torch.equal, NaN positions included). Between the two runs the free memory of the
caching allocator is filled with different bytes, so a read of memory no kernel wrote shows up as
a difference. The same cases run on the CPU path (small sizes) and, on Hopper, on the kernels.
"""

from collections.abc import Callable

import pytest
import torch
from conftest import flatten, requires_sm90
from test_layer import ROUTERS, reference_forward

import moe_kernels
from moe_kernels import MoE, reference
from moe_kernels.ops.grouped_gemm import grouped_gemm_dgrad, grouped_gemm_wgrad, silu_mul_backward
from moe_kernels.ops.quant import quantize_fp8_transposed
from moe_kernels.testing import assert_bitwise_equal, calc_diff, capture_cuda_graph

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=requires_sm90)]

ROUTER = ROUTERS["deepseek_v3"]  # DeepSeek-V3's router semantics at a small size
HIDDEN, INTER, SHARED = 256, 128, 128


def make_layer(device: str, fp8: bool = False, **kw) -> MoE:
    torch.manual_seed(0)
    moe = MoE(
        HIDDEN, INTER, ROUTER, shared_intermediate_size=SHARED, device=device, init_std=0.05, **kw
    ).eval()
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(ROUTER.num_experts) * 0.1)
    return moe.quantize_(shared_experts=True) if fp8 else moe


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------


def routed_counts(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Tokens per expert that the reference router gives for x on the layer's current weights."""
    logits = torch.nn.functional.linear(x.float().cpu(), moe.gate.weight.float().cpu())
    _, _, counts = reference.router(
        logits, ROUTER.top_k, bias=moe.expert_bias.cpu(), **ROUTER.router_kwargs()
    )
    return counts


@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
def test_layer_forward_never_syncs_with_the_host(fp8):
    """What capture needs: the inference forward makes no host sync (torch's sync debug mode
    raises on any synchronising call)."""
    moe = make_layer("cuda", fp8)
    x = randn(300, HIDDEN, dtype=BF16, device="cuda")
    with torch.no_grad():
        moe(x)  # lazy initialisation (side stream, events) happens here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
def test_layer_graph_replays_with_new_inputs_and_routing(fp8):
    tokens, cold = 256, 11
    moe, ref_moe = make_layer("cuda", fp8), make_layer("cpu", fp8)
    static_x = torch.empty(tokens, HIDDEN, dtype=BF16, device="cuda")
    bias = moe.expert_bias
    with torch.no_grad():
        static_x.copy_(randn(tokens, HIDDEN, dtype=BF16, seed=1))
        bias[cold] = -10.0  # sigmoid scores lie in (0, 1): expert `cold` is never picked at capture
        assert routed_counts(moe, static_x)[cold] == 0
        graph, static_out = capture_cuda_graph(lambda: moe(static_x))

        def new_tokens(step):
            static_x.copy_(randn(tokens, HIDDEN, dtype=BF16, seed=10 + step))

        def new_gate(step):
            moe.gate.weight.copy_(randn(*moe.gate.weight.shape, dtype=BF16, seed=20 + step) * 0.05)

        def new_bias(step):
            bias.copy_(randn(ROUTER.num_experts, seed=30 + step) * 0.1)
            bias[cold] = -10.0

        def cold_takes_every_token(step):
            bias[cold] = 10.0  # now every token's first choice: 0 rows -> all rows

        def cold_again(step):
            bias[cold] = -10.0

        schedule = [new_tokens, new_gate, new_bias, cold_takes_every_token, new_tokens, cold_again]
        for step, change in enumerate(schedule):
            change(step)
            counts = routed_counts(moe, static_x)
            if change is cold_takes_every_token:
                assert counts[cold] == tokens, "test setup: expert `cold` should take every token"
            if change is cold_again:
                assert counts[cold] == 0
            graph.replay()
            eager = moe(static_x)
            case = f"{fp8=} step {step} ({change.__name__}), loads {counts.tolist()}"
            assert torch.equal(static_out, eager), f"{case}: replay differs from eager"
            ref_moe.load_state_dict(moe.state_dict())
            ref = reference_forward(ref_moe, static_x.cpu())
            err = calc_diff(static_out.cpu().float(), ref.float())
            assert err < (2e-3 if fp8 else 1e-4), f"{case}: calc_diff {err} against the reference"
    moe_kernels.check_device_errors()


# ------------------------------------------------------------------------------------------------
# Determinism: each case returns a closure that runs the op once on fixed inputs
# ------------------------------------------------------------------------------------------------

CASES: dict[str, Callable] = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def sizes(device):
    """(T, H, E, K, I): large enough on the GPU for many blocks per kernel, small on the CPU."""
    return (4096, 512, 32, 4, 256) if device == "cuda" else (48, 256, 8, 2, 128)


def routing(device, tokens, experts, top_k):
    scores = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(5))
    return scores.topk(top_k, dim=1).indices.to(torch.int32).to(device)


def offsets_for(device, rows, experts, seed=3):
    """Uneven offsets over all rows, with two empty experts."""
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(seed))
    weights[1] = weights[experts // 2] = 0
    counts = (weights / weights.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).to(device)


@case("quantize_fp8")
def _(d):
    t, h, *_ = sizes(d)
    x = randn(t, h, dtype=BF16, device=d)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    return lambda: moe_kernels.quantize_fp8(x)


@case("quantize_fp8_weight+dequantize")
def _(d):
    _, h, e, _, i = sizes(d)
    w = randn(e, 2 * i + 64, h, device=d)

    def run():
        q, s = moe_kernels.quantize_fp8_weight(w, pow2_scale=True)
        return q, s, moe_kernels.dequantize_fp8(q, s)

    return run


@case("quantize_fp8_transposed")
def _(d):
    t, h, e, k, _ = sizes(d)
    x, offsets = randn(t * k, h, dtype=BF16, device=d), offsets_for(d, t * k, e)
    used = int(reference.padded_offsets(offsets.cpu())[-1]) * h

    def run():
        q, s, padded = quantize_fp8_transposed(x, offsets)
        return q[:used], s[: used // 128], padded

    return run


@case("router")
def _(d):
    t, _, e, k, _ = sizes(d)
    logits, bias = randn(t, 8 * e, device=d), randn(8 * e, device=d) * 0.1
    return lambda: moe_kernels.router(
        logits, 8, bias=bias, score_func="sigmoid", num_groups=8, topk_groups=4, return_counts=True
    )


@case("router_backward")
def _(d):
    t, _, e, _, _ = sizes(d)
    logits, grad = randn(t, e, device=d), randn(t, 4, device=d, seed=1)

    def run():
        leaf = logits.clone().requires_grad_(True)
        weights, _, _ = moe_kernels.router(leaf, 4, score_func="softmax")
        weights.backward(grad)
        return leaf.grad

    return run


@case("balance_loss+backward")
def _(d):
    t, _, e, k, _ = sizes(d)
    logits, ids = randn(t, e, device=d), routing(d, t, e, k)
    seqs = torch.tensor([0, t // 3, t // 3, t], dtype=torch.int32, device=d)

    def run():
        leaf = logits.clone().requires_grad_(True)
        loss = moe_kernels.balance_loss(leaf, ids, alpha=0.01, seq_offsets=seqs)
        loss.backward()
        return loss, leaf.grad

    return run


@case("update_expert_bias_")
def _(d):
    _, _, e, _, _ = sizes(d)
    start, counts = (
        randn(e, device=d),
        torch.randint(0, 100, (e,), generator=torch.Generator().manual_seed(0)),
    )
    return lambda: moe_kernels.update_expert_bias_(start.clone(), counts.int().to(d), 1e-3)


@case("permute")
def _(d):
    t, h, e, k, _ = sizes(d)
    x, ids = randn(t, h, dtype=BF16, device=d), routing(d, t, e, k)
    ids[0, 0] = -1

    def run():
        r = moe_kernels.permute(x, ids, e, align=16)
        used = int(r.expert_offsets[-1])
        return r.out[:used], r.expert_offsets, r.row_map

    return run


@case("permute_quantize")
def _(d):
    t, h, e, k, _ = sizes(d)
    x, ids = randn(t, h, dtype=BF16, device=d), routing(d, t, e, k)
    return lambda: moe_kernels.permute(x, ids, e, quantize=True)  # align 1: every row is used


@case("permute+unpermute_backward")
def _(d):
    t, h, e, k, _ = sizes(d)
    x, ids = randn(t, h, dtype=BF16, device=d), routing(d, t, e, k)
    weights, grad = randn(t, k, device=d).abs(), randn(t, h, dtype=BF16, device=d, seed=2)

    def run():
        leaf, w = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        r = moe_kernels.permute(leaf, ids, e)
        y = r.out * 2  # a differentiable stand-in for the experts
        out = moe_kernels.unpermute(y, r.row_map, w, shared_output=leaf)
        out.backward(grad)
        return out, leaf.grad, w.grad

    return run


def gemm_case(d, fp8, config):
    t, h, e, k, i = sizes(d)
    rows = t * k
    a, b, offsets = (
        randn(rows, h, device=d),
        randn(e, 2 * i, h, device=d, seed=1) / h**0.5,
        offsets_for(d, rows, e),
    )
    if fp8:
        (a, a_s), (b, b_s) = moe_kernels.quantize_fp8(a), moe_kernels.quantize_fp8_weight(b)
        return lambda: moe_kernels.grouped_gemm(a, b, offsets, a_scales=a_s, b_scales=b_s, config=config)
    a, b = a.to(BF16), b.to(BF16)
    return lambda: moe_kernels.grouped_gemm(a, b, offsets, config=config)


for _config in moe_kernels.GEMM_CONFIGS:
    for _fp8 in (False, True):
        if _config == "auto" or _config.startswith("fp8" if _fp8 else "bf16"):
            case(f"grouped_gemm_{'fp8' if _fp8 else 'bf16'}_{_config}")(
                lambda d, fp8=_fp8, config=_config: gemm_case(d, fp8, config)
            )


@case("grouped_gemm_dgrad+wgrad")
def _(d):
    t, h, e, k, i = sizes(d)
    rows = t * k
    grad, a = randn(rows, 2 * i, dtype=BF16, device=d), randn(rows, h, dtype=BF16, device=d, seed=1)
    b, offsets = randn(e, 2 * i, h, dtype=BF16, device=d, seed=2), offsets_for(d, rows, e)

    def run():
        return (
            grouped_gemm_dgrad(grad, b, offsets),
            grouped_gemm_wgrad(grad, a, offsets),
            grouped_gemm_wgrad(grad, a, offsets, out_dtype=torch.float32),
            grouped_gemm_wgrad(grad, a, offsets, config="pingpong"),
            grouped_gemm_wgrad(grad, a, offsets, fp8=True),
        )

    return run


@case("grouped_gemm_autograd")
def _(d):
    t, h, e, k, i = sizes(d)
    rows = t * k
    a, b = randn(rows, h, dtype=BF16, device=d), randn(e, 2 * i, h, dtype=BF16, device=d, seed=1) / 8
    offsets, grad = offsets_for(d, rows, e), randn(rows, 2 * i, dtype=BF16, device=d, seed=2)

    def run():
        la, lb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        moe_kernels.grouped_gemm(la, lb, offsets).backward(grad)
        return la.grad, lb.grad

    return run


@case("silu_mul+backward")
def _(d):
    t, _, e, k, i = sizes(d)
    h, grad = randn(t * k, 2 * i, dtype=BF16, device=d), randn(t * k, i, dtype=BF16, device=d, seed=1)

    def run():
        leaf = h.clone().requires_grad_(True)
        act, _ = moe_kernels.silu_mul(leaf)
        act.backward(grad)
        return (
            act,
            leaf.grad,
            moe_kernels.silu_mul(h, quantize=True),
            silu_mul_backward(grad, h, return_act=True, quantize=True),
        )

    return run


@case("expert_mlp_bf16+fp8")
def _(d):
    t, h, e, k, i = sizes(d)
    x, ids = randn(t, h, dtype=BF16, device=d), routing(d, t, e, k)
    w_gate_up, w_down = randn(e, 2 * i, h, device=d) / h**0.5, randn(e, h, i, device=d, seed=1) / i**0.5
    (gu, gu_s), (dn, dn_s) = (
        moe_kernels.quantize_fp8_weight(w_gate_up),
        moe_kernels.quantize_fp8_weight(w_down),
    )

    def run():
        r = moe_kernels.permute(x, ids, e)
        r8 = moe_kernels.permute(x, ids, e, quantize=True)
        scales = dict(x_scales=r8.out_scales, w_gate_up_scales=gu_s, w_down_scales=dn_s)
        return (
            moe_kernels.expert_mlp(r.out, r.expert_offsets, w_gate_up.to(BF16), w_down.to(BF16)),
            moe_kernels.expert_mlp(r8.out, r8.expert_offsets, gu, dn, **scales),
        )

    return run


def layer_case(d, fp8, **kw):
    t, *_ = sizes(d)
    moe, x = make_layer(d, fp8, **kw), randn(t, HIDDEN, dtype=BF16, device=d, seed=7)

    def run():
        with torch.no_grad():
            return moe(x)

    return run


case("layer_forward_bf16")(lambda d: layer_case(d, False))
case("layer_forward_fp8")(lambda d: layer_case(d, True))


def layer_backward_case(d, frozen_fp8=False, **kw):
    t, *_ = sizes(d)
    moe = make_layer(d, **kw)
    if frozen_fp8:  # routed experts only: FP8 shared experts do not pass gradients (see the report)
        moe.quantize_()
    x, grad = randn(t, HIDDEN, dtype=BF16, device=d, seed=7), randn(t, HIDDEN, dtype=BF16, device=d, seed=8)
    params = [p for p in moe.parameters() if p.requires_grad]

    def run():
        moe.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        moe(leaf).backward(grad)
        return [leaf.grad, *(p.grad for p in params)]

    return run


case("layer_backward_bf16")(lambda d: layer_backward_case(d))
case("layer_backward_fp8_training")(lambda d: layer_backward_case(d, fp8_training=True))
case("layer_backward_frozen_fp8")(lambda d: layer_backward_case(d, frozen_fp8=True))


def fill_free_memory(byte: int) -> None:
    """Fill the caching allocator's free blocks with `byte` (see poison_allocator_)."""
    blocks = [
        torch.full((n,), byte, dtype=torch.uint8, device="cuda")
        for n in [64 << 20 >> s for s in range(0, 16, 2)]
    ]
    del blocks


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_two_runs_are_bit_identical(name, device):
    run = CASES[name](device)
    outputs = []
    for byte in (0xFF, 0x3C):
        if device == "cuda":
            fill_free_memory(byte)
        outputs.append([t.detach().clone().reshape(-1) for t in flatten(run())])  # 0-d too
    first, second = outputs
    assert len(first) == len(second) and first, name
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        # torch.equal on the raw bytes, NaNs required in the same places
        assert_bitwise_equal(a, b, f"{name} on {device}: output {i} differs between two runs")
    if device == "cuda":
        moe_kernels.check_device_errors()
