"""The MoE module: CPU path (bit-equal to the chained references), balancing, gradients, errors;
on Hopper the kernels against the references, T = 0, streams and CUDA-graph replay."""

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import requires_sm90

import moe_kernels
from moe_kernels import MODEL_PRESETS, BalanceLoss, MoE, RouterPreset, reference
from moe_kernels.layers import FP8SwiGLUMLP
from moe_kernels.testing import calc_diff, capture_cuda_graph, poison_allocator_, rel_error

# Small routers with the semantics of the model families (DESIGN.md §2), E = 16 or 8.
ROUTERS = {
    "deepseek_v3": RouterPreset(
        num_experts=16,
        top_k=4,
        score_func="sigmoid",
        uses_bias=True,
        num_groups=4,
        topk_groups=2,
        scaling_factor=2.5,
    ),
    "deepseek_v2": RouterPreset(
        num_experts=16,
        top_k=3,
        score_func="softmax",
        num_groups=4,
        topk_groups=2,
        group_score="max",
        renormalize=False,
        scaling_factor=16.0,
    ),
    "qwen3_moe": RouterPreset(num_experts=16, top_k=4, score_func="softmax"),
    "mixtral": RouterPreset(num_experts=8, top_k=2, score_func="softmax"),
}
HIDDEN, INTER = 256, 128


def make_moe(router="deepseek_v3", *, shared=128, shared_gate=False, fp8=False, device="cpu", **kw):
    """A small MoE with random weights and bias; fp8: routed and shared experts quantised."""
    torch.manual_seed(0)
    moe = MoE(
        HIDDEN,
        INTER,
        ROUTERS[router],
        shared_intermediate_size=shared,
        shared_expert_gate=shared_gate,
        device=device,
        init_std=0.05,
        **kw,
    ).eval()
    if moe.expert_bias is not None:
        moe.expert_bias.copy_(torch.randn(moe.num_experts) * 0.1)
    return moe.quantize_(shared_experts=True) if fp8 else moe


def reference_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """reference.moe_layer on the module's tensors (the shared output from the module's own MLP)."""
    tokens = x.reshape(-1, moe.hidden_size)
    shared = moe._shared(tokens) if moe.shared_experts is not None else None
    e = moe.experts
    p = moe.router_preset
    out = reference.moe_layer(
        tokens,
        moe.gate.weight,
        e.gate_up_proj,
        e.down_proj,
        p.top_k,
        w_gate_up_scales=e.gate_up_proj_scale_inv,
        w_down_scales=e.down_proj_scale_inv,
        shared_output=shared,
        logits_fp32=moe.logits_fp32,
        weights_dtype=moe.weights_dtype,
        bias=moe.expert_bias,
        **p.router_kwargs(),
    )
    return out.view(x.shape)


def randn(*shape, gen, device="cpu"):
    return torch.randn(*shape, generator=gen).bfloat16().to(device)


# ------------------------------------------------------------------------------------------------
# Everywhere: the CPU path, construction, balancing, gradients, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shared", [0, 128])
def test_cpu_matches_reference(router, fp8, shared, gen):
    moe = make_moe(router, shared=shared, fp8=fp8, logits_fp32=router.startswith("deepseek"))
    x = randn(3, 7, HIDDEN, gen=gen)
    with torch.no_grad():
        out, ref = moe(x), reference_forward(moe, x)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert torch.equal(out, ref), f"{router=} {fp8=} {shared=}"


def test_qwen2_shared_expert_gate_and_rounded_weights(gen):
    moe = make_moe("qwen3_moe", shared=256, shared_gate=True, logits_fp32=False, weights_dtype=torch.bfloat16)
    x = randn(9, HIDDEN, gen=gen)
    with torch.no_grad():
        out, ref = moe(x), reference_forward(moe, x)
        gate = torch.sigmoid(moe.shared_expert_gate(x))
    assert torch.equal(out, ref)
    assert not torch.equal(gate, torch.ones_like(gate))  # the gate does scale the shared output


@pytest.mark.parametrize("shape", [(0, HIDDEN), (2, 0, HIDDEN)])
@pytest.mark.parametrize("fp8", [False, True])
def test_zero_tokens(shape, fp8):
    moe = make_moe(fp8=fp8)
    with torch.no_grad():
        out = moe(torch.empty(shape, dtype=torch.bfloat16))
    assert out.shape == shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_from_config_presets(name):
    preset = MODEL_PRESETS[name]
    moe = MoE.from_config(name, device="meta")
    e, h, i = preset.router_preset.num_experts, preset.hidden_size, preset.intermediate_size
    assert moe.experts.gate_up_proj.shape == (e, 2 * i, h) and moe.experts.down_proj.shape == (e, h, i)
    assert moe.gate.weight.shape == (e, h)
    assert (moe.expert_bias is not None) == preset.router_preset.uses_bias
    assert (moe.shared_experts is not None) == (preset.shared_intermediate_size > 0)
    if moe.shared_experts is not None:
        assert moe.shared_experts.gate_proj.weight.shape == (preset.shared_intermediate_size, h)
    assert (moe.shared_expert_gate is not None) == preset.shared_expert_gate


def test_from_config_overrides_and_runs(gen):
    moe = MoE.from_config(
        "deepseek_v3",
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        shared_intermediate_size=128,
        router=ROUTERS["deepseek_v3"],
    ).eval()
    x = randn(5, HIDDEN, gen=gen)
    with torch.no_grad():
        assert torch.equal(moe(x), reference_forward(moe, x))


def test_quantize_is_quantize_fp8_weight():
    moe = make_moe()
    gate_up, down = moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone()
    moe.quantize_()
    for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
        q, s = reference.quantize_fp8_weight(w)
        assert torch.equal(getattr(moe.experts, name).view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(getattr(moe.experts, f"{name}_scale_inv"), s), name
        assert not getattr(moe.experts, name).requires_grad
    assert moe.is_fp8 and set(moe.state_dict()) >= {
        "experts.gate_up_proj_scale_inv",
        "experts.down_proj_scale_inv",
    }


def fp8_shared_reference(mlp, x):
    """The FP8 shared experts from the references: 1x128 tokens, one expert, [0, T] offsets."""
    x_q, x_s = reference.quantize_fp8(x)
    offsets = torch.tensor([0, x.shape[0]], dtype=torch.int32)
    return reference.expert_mlp(
        x_q,
        offsets,
        mlp.gate_up_proj,
        mlp.down_proj,
        x_scales=x_s,
        w_gate_up_scales=mlp.gate_up_proj_scale_inv,
        w_down_scales=mlp.down_proj_scale_inv,
    )


def test_fp8_shared_experts(gen):
    """quantize_() turns the shared MLP into FP8: weights bit-exact with quantize_fp8_weight of the
    concatenated gate/up rows, output equal to the reference chain."""
    moe = make_moe(shared=256)
    bf16_shared = moe.shared_experts
    moe.quantize_(shared_experts=True)
    fp8 = moe.shared_experts
    assert isinstance(fp8, FP8SwiGLUMLP) and fp8 is not bf16_shared
    gate_up = torch.cat([bf16_shared.gate_proj.weight, bf16_shared.up_proj.weight])[None]
    q, s = reference.quantize_fp8_weight(gate_up)
    assert torch.equal(fp8.gate_up_proj.view(torch.uint8), q.view(torch.uint8)) and torch.equal(
        fp8.gate_up_proj_scale_inv, s
    )
    x = randn(21, HIDDEN, gen=gen)
    with torch.no_grad():
        assert torch.equal(fp8(x), fp8_shared_reference(fp8, x))
        assert fp8(x[:0]).shape == (0, HIDDEN)
    assert make_moe(shared=256).quantize_().shared_experts.__class__ is not FP8SwiGLUMLP  # bf16 by default


def test_fp8_shared_experts_pass_input_gradients(gen):
    """Frozen FP8 shared experts pass their input's gradient (the FP8 recipe's backward), as the routed
    FP8 experts do; the forward is the same as without a gradient."""
    fp8 = make_moe(shared=256).quantize_(shared_experts=True).shared_experts
    x = randn(21, HIDDEN, gen=gen).requires_grad_(True)
    out = fp8(x)
    with torch.no_grad():
        assert torch.equal(out, fp8(x))
    grad = randn(21, HIDDEN, gen=gen)
    out.backward(grad)
    # Reference: the dequantised weights in fp32 autograd.
    gate_up = reference.dequantize_fp8(fp8.gate_up_proj, fp8.gate_up_proj_scale_inv)[0].float()
    down = reference.dequantize_fp8(fp8.down_proj, fp8.down_proj_scale_inv)[0].float()
    xf = x.detach().float().requires_grad_(True)
    gate, up = (xf @ gate_up.T).chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up @ down.T).backward(grad.float())
    assert rel_error(x.grad.float(), xf.grad) < 0.1, rel_error(x.grad.float(), xf.grad)


def test_fp8_shared_experts_from_fp8_linears(gen):
    """transformers' FP8Linear layout (e4m3 weight + weight_scale_inv) is taken as it is."""
    mlp = torch.nn.Module()
    for name, shape in (
        ("gate_proj", (256, HIDDEN)),
        ("up_proj", (256, HIDDEN)),
        ("down_proj", (HIDDEN, 256)),
    ):
        lin = torch.nn.Module()
        lin.weight, lin.weight_scale_inv = reference.quantize_fp8_weight(
            torch.randn(shape, generator=gen) * 0.05
        )
        lin.bias, lin.block_size = None, (128, 128)
        setattr(mlp, name, lin)
    fp8 = FP8SwiGLUMLP.from_mlp(mlp)
    assert torch.equal(fp8.gate_up_proj[0, :256].view(torch.uint8), mlp.gate_proj.weight.view(torch.uint8))
    assert torch.equal(fp8.gate_up_proj_scale_inv[0, 2:], mlp.up_proj.weight_scale_inv)
    x = randn(5, HIDDEN, gen=gen)
    with torch.no_grad():
        assert torch.equal(fp8(x), fp8_shared_reference(fp8, x))


def test_training_counts_and_bias_update(gen):
    moe = make_moe().train()
    x1, x2 = randn(11, HIDDEN, gen=gen), randn(2, 5, HIDDEN, gen=gen)
    expected = torch.zeros(moe.num_experts, dtype=torch.int64)
    for x in (x1, x2):
        with torch.no_grad():
            logits = torch.nn.functional.linear(x.reshape(-1, HIDDEN).float(), moe.gate.weight.float())
            _, ids, _ = reference.router(
                logits, 4, bias=moe.expert_bias, **ROUTERS["deepseek_v3"].router_kwargs()
            )
        expected += torch.bincount(ids.flatten().long(), minlength=moe.num_experts)
        with torch.no_grad():
            moe(x)
    assert torch.equal(moe.routed_counts, expected)
    bias_before = moe.expert_bias.clone()
    want = reference.update_expert_bias(bias_before.clone(), expected, 1e-3)
    moe.update_bias(1e-3)
    assert torch.equal(moe.expert_bias, want)
    assert int(moe.routed_counts.abs().sum()) == 0
    with torch.no_grad():  # inference does not count
        moe.eval()(x1)
    assert int(moe.routed_counts.abs().sum()) == 0


def test_bias_moves_against_a_forced_imbalance(gen):
    moe = make_moe().train()
    with torch.no_grad():
        moe.gate.weight.mul_(0.1)  # other scores near 1/2, so group 0 (experts 0-3) always makes the cut
        moe.gate.weight[3] = 1.0  # with x >= 0 every token's top expert is 3
        moe.expert_bias.zero_()
        moe(randn(64, HIDDEN, gen=gen).abs())
    counts = moe.routed_counts.clone()
    assert counts[3] == 64 and counts.sum() == 64 * 4
    moe.update_bias(1e-2)
    assert moe.expert_bias[3] == pytest.approx(-1e-2)  # overloaded: pushed down
    idle = moe.expert_bias[counts == 0]
    assert len(idle) > 0 and torch.equal(idle, torch.full_like(idle, 1e-2))  # idle: pulled up


def test_update_bias_needs_a_bias():
    with pytest.raises(ValueError, match="MoE.update_bias: this layer's router has no expert bias"):
        make_moe("qwen3_moe").update_bias(1e-3)


def test_balance_losses(gen):
    balance = BalanceLoss(expert=0.01, device=0.02, num_devices=4, sequence=0.03)
    moe = make_moe(balance_loss=balance).train()
    x = randn(3, 6, HIDDEN, gen=gen)
    moe(x)
    logits = torch.nn.functional.linear(x.reshape(-1, HIDDEN).float(), moe.gate.weight.float())
    _, ids, _ = reference.router(logits, 4, bias=moe.expert_bias, **ROUTERS["deepseek_v3"].router_kwargs())
    kw = dict(score_func="sigmoid")
    want = {
        "expert": reference.balance_loss(logits, ids, alpha=0.01, **kw),
        "device": reference.balance_loss(logits, ids, alpha=0.02, num_devices=4, **kw),
        "sequence": reference.balance_loss(logits, ids, alpha=0.03, seq_lens=[6, 6, 6], **kw),
    }
    assert set(moe.balance_losses) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(moe.balance_losses[name], value.float(), rtol=1e-5, atol=1e-7, msg=name)
    moe.zero_grad()
    moe.aux_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_training_gradients_match_reference_autograd(gen):
    moe = make_moe("qwen3_moe", shared=128, logits_fp32=True).train()
    x = randn(13, HIDDEN, gen=gen).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        out = moe(x)
    grad_out = randn(13, HIDDEN, gen=gen)
    params = [x, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj]
    got = torch.autograd.grad(out, params, grad_out)
    ref = reference_forward(moe, x)
    want = torch.autograd.grad(ref, params, grad_out)
    for name, g, w in zip(("x", "gate", "gate_up", "down"), got, want, strict=True):
        assert g.abs().sum() > 0, name
        # x's gradient sums the pairs' rows in another order (bf16 roundings): ~2e-3
        assert rel_error(g, w) < 1e-2, f"{name}: {rel_error(g, w)}"


def test_frozen_fp8_experts_pass_the_input_gradient(gen):
    """Quantised experts get no gradient; their input does (the FP8 recipe's backward), matching
    the bf16 layer's within FP8 error."""
    bf16 = make_moe("qwen3_moe", shared=0).train()
    fp8 = make_moe("qwen3_moe", shared=0).quantize_().train()
    x = randn(9, HIDDEN, gen=gen)
    grad_out = randn(9, HIDDEN, gen=gen)
    grads = []
    for moe in (bf16, fp8):
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(moe(leaf), leaf, grad_out)
        grads.append(g)
    assert grads[1].abs().sum() > 0 and rel_error(grads[1], grads[0]) < 0.1, rel_error(grads[1], grads[0])
    assert not fp8.experts.gate_up_proj.requires_grad


def test_fp8_training_matches_bf16_gradients(gen):
    """MoE(fp8_training=True): the bf16 master weights get gradients through the FP8 recipe."""
    bf16 = make_moe("qwen3_moe", shared=0).train()
    fp8 = make_moe("qwen3_moe", shared=0, fp8_training=True).train()
    x = randn(11, HIDDEN, gen=gen)
    grad_out = randn(11, HIDDEN, gen=gen)
    grads = []
    for moe in (bf16, fp8):
        leaf = x.clone().requires_grad_(True)
        params = [leaf, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj]
        grads.append(torch.autograd.grad(moe(leaf), params, grad_out))
    for name, g8, g16 in zip(("x", "gate", "gate_up", "down"), *reversed(grads), strict=True):
        assert g8.abs().sum() > 0 and rel_error(g8, g16) < 0.1, f"{name}: {rel_error(g8, g16)}"


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: MoE(200, 128, "deepseek_v3", device="meta"),
            "hidden_size must be a positive multiple of 128",
        ),
        (
            lambda: MoE(256, 100, "deepseek_v3", device="meta"),
            "intermediate_size must be a positive multiple",
        ),
        (lambda: MoE(256, 128, "deepseek_v3", dtype=torch.float16, device="meta"), "dtype must be bfloat16"),
        (lambda: MoE(256, 128, "nope", device="meta"), "nope"),
    ],
)
def test_bad_construction(build, message):
    with pytest.raises((ValueError, KeyError), match=message):
        build()


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(4, HIDDEN), "MoE: x must be bfloat16, got torch.float32"),
        (torch.zeros(4, 128, dtype=torch.bfloat16), r"MoE: x must be \[..., 256\], got \[4, 128\]"),
    ],
)
def test_bad_input(x, message):
    with pytest.raises(ValueError, match=message):
        make_moe()(x)


def test_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, moe_kernels\n"
        "m = moe_kernels.MoE.from_config('qwen3_moe', hidden_size=128, intermediate_size=128,"
        " router=moe_kernels.RouterPreset(num_experts=4, top_k=2, score_func='softmax'))\n"
        "with torch.no_grad(): print(m(torch.randn(3, 128, dtype=torch.bfloat16)).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([3, 128])" in done.stdout


def test_layers_import_rule():
    """layers/ and ops/ never import transformers or the integrations (the written import rule)."""
    import ast
    import pathlib

    root = pathlib.Path(moe_kernels.__file__).parent
    for folder in ("layers", "ops"):
        for path in (root / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    for name in names:
                        assert not name.startswith(("transformers", "moe_kernels.integrations")), (path, name)


# ------------------------------------------------------------------------------------------------
# Hopper: kernels against the references
# ------------------------------------------------------------------------------------------------


@requires_sm90
@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [0, 1, 37, 300])
def test_gpu_matches_reference(router, fp8, tokens, gen):
    moe = make_moe(router, fp8=fp8, device="cuda", logits_fp32=router.startswith("deepseek"))
    x = randn(tokens, HIDDEN, gen=gen, device="cuda")
    poison_allocator_()
    with torch.no_grad():
        out = moe(x)
        ref = reference_forward(moe.cpu(), x.cpu())
    assert out.shape == x.shape
    if tokens:
        err = calc_diff(out.cpu().float(), ref.float())
        assert err < (2e-3 if fp8 else 1e-4), f"{router=} {fp8=} {tokens=}: calc_diff {err}"


@requires_sm90
@pytest.mark.parametrize("tokens", [0, 1, 300])
def test_gpu_fp8_shared_experts(tokens, gen):
    fp8 = make_moe(shared=256, device="cuda").quantize_(shared_experts=True).shared_experts
    x = randn(tokens, HIDDEN, gen=gen, device="cuda")
    with torch.no_grad():
        out = fp8(x)
        ref = fp8_shared_reference(fp8.cpu(), x.cpu())
    assert out.shape == (tokens, HIDDEN)
    if tokens:
        assert calc_diff(out.cpu().float(), ref.float()) < 2e-3


@requires_sm90
def test_gpu_shared_gate_on_a_user_stream(gen):
    moe = make_moe("qwen3_moe", shared=256, shared_gate=True, device="cuda", logits_fp32=False)
    x = randn(100, HIDDEN, gen=gen, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        out = moe(x)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():
        ref = reference_forward(moe.cpu(), x.cpu())
    assert calc_diff(out.cpu().float(), ref.float()) < 1e-4


@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_replay_with_new_routing(fp8, gen):
    """Captured once, replayed with new tokens and a new gate: every expert's load changes, one
    expert goes from 0 rows to all of them."""
    moe = make_moe("deepseek_v3", fp8=fp8, device="cuda")
    static_x = randn(64, HIDDEN, gen=gen, device="cuda").abs()
    with torch.no_grad():
        moe.gate.weight[5] = -1.0  # with x >= 0 expert 5 is idle at capture
        graph, static_out = capture_cuda_graph(lambda: moe(static_x))
        for step in range(3):
            static_x.copy_(randn(64, HIDDEN, gen=gen, device="cuda").abs())
            if step == 2:
                moe.gate.weight[5] = 1.0  # expert 5 now takes every token
            graph.replay()
            eager = moe(static_x)
            assert torch.equal(static_out, eager), f"{fp8=} replay {step}"
        logits = torch.nn.functional.linear(static_x.float(), moe.gate.weight.float())
        _, ids, _ = reference.router(
            logits.cpu(), 4, bias=moe.expert_bias.cpu(), **ROUTERS["deepseek_v3"].router_kwargs()
        )
        assert bool((ids == 5).any(-1).all())


@requires_sm90
@pytest.mark.parametrize("fp8_training", [False, True])
def test_gpu_training_loop(fp8_training, gen):
    """A few optimiser steps of the layer on the kernels (bf16, and DeepSeek-V3's FP8 recipe): the
    loss goes down, the expert bias moves against the load it sees, the gradients are those of the
    reference's autograd."""
    moe = make_moe("deepseek_v3", device="cuda", fp8_training=fp8_training).train()
    x = randn(512, HIDDEN, gen=gen, device="cuda")
    target = randn(512, HIDDEN, gen=gen, device="cuda") * 0.1
    params = [p for p in moe.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    losses = []
    for _ in range(6):
        loss = (moe(x).float() - target.float()).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        counts = moe.routed_counts.clone()
        bias_before = moe.expert_bias.clone()
        moe.update_bias(1e-3)
        moved = (moe.expert_bias - bias_before).sign()
        assert torch.equal(moved, (counts.float().mean() - counts.float()).sign()), "bias moved the wrong way"
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # gradients of one more step against the reference's autograd on the CPU
    leaf = x[:64].clone().requires_grad_(True)
    grad_out = randn(64, HIDDEN, gen=gen, device="cuda")
    checked = [leaf, moe.experts.gate_up_proj, moe.experts.down_proj]
    got = torch.autograd.grad(moe(leaf), checked, grad_out)
    ref_moe = make_moe("deepseek_v3")
    ref_moe.load_state_dict({name: t.cpu() for name, t in moe.state_dict().items()})
    ref_leaves = [
        leaf.detach().cpu().requires_grad_(True),
        ref_moe.experts.gate_up_proj,
        ref_moe.experts.down_proj,
    ]
    want = torch.autograd.grad(reference_forward(ref_moe, ref_leaves[0]), ref_leaves, grad_out.cpu())
    tol = 0.1 if fp8_training else 2e-2
    for name, g, w in zip(("x", "gate_up", "down"), got, want, strict=True):
        assert rel_error(g.cpu().float(), w.float()) < tol, f"{name}: {rel_error(g.cpu().float(), w.float())}"
