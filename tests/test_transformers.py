"""transformers integration: patch / unpatch and MoE.from_transformers on tiny offline models of every
family (CPU path everywhere, kernels on Hopper), FP8 checkpoints, generation, CUDA graphs, and the
real DeepSeek-V3 and Qwen3-30B-A3B layers against transformers' blocks.

Tolerance for bf16 models: the patched model's logits may differ from the unpatched ones by at most
BF16_ERROR_FACTOR times the unpatched bf16 model's own error against the same model in fp32.
"""

import copy
import warnings

import pytest
import torch
from conftest import requires_sm90

pytest.importorskip("transformers", reason="the transformers tests need `pip install -e .[transformers]`")

import transformers  # noqa: E402

from moe_kernels import MoE  # noqa: E402
from moe_kernels.integrations import transformers as mkt  # noqa: E402
from moe_kernels.layers.transformers_blocks import Unsupported  # noqa: E402
from moe_kernels.testing import BF16_ERROR_FACTOR, capture_cuda_graph, rel_error  # noqa: E402
from moe_kernels.testing.transformers_models import (  # noqa: E402
    SUPPORTED_FAMILIES,
    RoutingRecorder,
    first_routing_flips,
    moe_blocks,
    randomise_,
    real_block,
    tiny_config,
    tiny_model,
)


def prompt(batch=2, length=8, vocab=128, seed=0, device="cpu"):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def fp32_copy(model):
    return copy.deepcopy(model).float()


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def assert_close_to_unpatched(patched, unpatched, fp32, msg):
    tol = BF16_ERROR_FACTOR * rel_error(unpatched, fp32)
    err = rel_error(patched, unpatched)
    assert err <= tol, f"{msg}: patched vs unpatched {err:.2e} > {tol:.2e} (2x the bf16 model's own error)"


def recorded_logits(model, ids):
    recorder = RoutingRecorder(model)
    out = logits(model, ids)
    recorder.remove()
    return out, recorder


def patch_and_compare(model, ids, msg, patch=mkt.patch):
    """Patch the model and check its logits against the unpatched ones, on the positions before any
    router flipped a near-tie (a flip changes that token and, through attention, the rest of its
    sequence; first_routing_flips asserts every flip is a near-tie). Returns the unpatched logits."""
    before, recorded_before = recorded_logits(model, ids)
    reference32 = logits(fp32_copy(model), ids)
    patch(model)
    patched, recorded_patched = recorded_logits(model, ids)
    batch, seq = ids.shape
    first_flip = first_routing_flips(recorded_before, recorded_patched, batch, seq)
    keep = torch.arange(seq)[None, :] < first_flip[:, None]
    assert keep.float().mean() >= 0.5, f"{msg}: near-ties flipped routing too early to compare: {first_flip}"
    keep = keep.to(before.device)
    assert_close_to_unpatched(patched[keep], before[keep], reference32[keep], msg)
    return before


# ------------------------------------------------------------------------------------------------
# CPU (and any device): the patch, through the ops' CPU path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_patch_matches_and_unpatch_restores(family):
    model = tiny_model(family)
    ids = prompt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module of a supported family is fused: no warning
        before = patch_and_compare(model, ids, family)
    assert mkt.is_patched(model) and model.config._experts_implementation == mkt.IMPLEMENTATION
    routers = [b.gate for b in moe_blocks(model)]
    assert routers and all(type(r).__name__.startswith("MoEKernels") for r in routers)
    mkt.unpatch(model)
    assert not mkt.is_patched(model) and model.config._experts_implementation == "grouped_mm"
    assert not any(type(b.gate).__name__.startswith("MoEKernels") for b in moe_blocks(model))
    assert torch.equal(logits(model, ids), before), f"{family}: unpatch must restore bit-identical logits"


def test_patched_experts_run_the_kernels(monkeypatch):
    model = mkt.patch(tiny_model("qwen3_moe"))
    calls = []
    real = mkt.routed_expert_mlp
    monkeypatch.setattr(mkt, "routed_expert_mlp", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits(model, prompt())
    assert len(calls) == len(moe_blocks(model))


def test_select_at_load_time():
    """Registering happens on import: the name is valid for from_config / from_pretrained."""
    config = tiny_config("deepseek_v3")
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, experts_implementation=mkt.IMPLEMENTATION
    )
    randomise_(model).eval()
    ids = prompt()
    ours = logits(model, ids)
    model.set_experts_implementation("grouped_mm")
    assert_close_to_unpatched(ours, logits(model, ids), logits(fp32_copy(model), ids), "deepseek_v3 at load")


def test_gpt_oss_warns_and_keeps_its_forward():
    model = tiny_model("gpt_oss")
    ids = prompt()
    before = logits(model, ids)
    with pytest.warns(UserWarning, match=r"model.layers.0.mlp and 1 more keep its forward: GPT-OSS"):
        mkt.patch(model)
    assert torch.equal(logits(model, ids), before)
    mkt.unpatch(model)


def test_unmatched_router_warns_and_keeps_its_forward():
    """top_k = 20 exceeds the fused router's 16: that router keeps transformers' forward, the experts
    are still fused."""
    model = tiny_model("qwen3_moe", experts=32, top_k=20)
    with pytest.warns(
        UserWarning, match=r"model.layers.0.mlp.gate and 1 more keep its router: .*top_k must be"
    ):
        patch_and_compare(model, prompt(), "qwen3 top_k=20")
    assert not any(type(b.gate).__name__.startswith("MoEKernels") for b in moe_blocks(model))


def test_unmatched_experts_warn_and_fall_back():
    """Intermediate size 96 is not a multiple of 128: the experts keep grouped_mm, with one warning."""
    model = tiny_model("olmoe", intermediate=96)
    ids = prompt()
    before = logits(model, ids)
    with pytest.warns(
        UserWarning, match=r"model.layers.0.mlp.experts and 1 more keep its experts implementation"
    ):
        mkt.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already said at patch time
        patched = logits(model, ids)
    torch.testing.assert_close(patched, before, rtol=0, atol=0.05)  # same experts math, fused router


def _train_steps(model, ids, steps, lr=2e-3):
    """Losses of `steps` AdamW steps on one batch (the loss before each step)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_sm90)])
def test_training_runs_on_the_kernels(device):
    """The patched model trains through the kernels (no fallback, no warning): the router, the
    experts' dgrad and wgrad get gradients, and a few optimiser steps follow the unpatched model's
    losses."""
    unpatched = tiny_model("deepseek_v3", device=device)
    model = mkt.patch(copy.deepcopy(unpatched))
    ids = prompt(device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()(ids, labels=ids).loss.backward()
    block = moe_blocks(model)[0]
    for name, param in (("gate_up", block.experts.gate_up_proj), ("router", block.gate.weight)):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()
    ours, theirs = _train_steps(model, ids, 5), _train_steps(unpatched, ids, 5)
    assert ours[-1] < ours[0], ours
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a - b) <= 0.03 * abs(b), f"step {step}: {ours} vs unpatched {theirs}"


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_moe_from_transformers_shares_weights_and_matches(family):
    model = tiny_model(family)
    block = moe_blocks(model)[-1]
    moe = MoE.from_transformers(block).eval()
    assert moe.experts.gate_up_proj is block.experts.gate_up_proj
    assert moe.gate.weight is block.gate.weight
    if family in ("deepseek_v3", "kimi_k2"):
        assert moe.expert_bias is block.gate.e_score_correction_bias
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        ours, theirs, fp32 = moe(x), block(x), copy.deepcopy(block).float()(x.float())
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert_close_to_unpatched(ours.float(), theirs.float(), fp32.float(), family)


def test_quantize_leaves_the_transformers_block_alone():
    block = moe_blocks(tiny_model("deepseek_v3"))[-1]
    moe = MoE.from_transformers(block).quantize_(shared_experts=True)
    assert moe.is_fp8 and type(moe.shared_experts).__name__ == "FP8SwiGLUMLP"
    assert (
        block.experts.gate_up_proj.dtype == torch.bfloat16
        and block.shared_experts.gate_proj.weight.dtype == torch.bfloat16
    )


def test_ue8m0_scales_are_converted_once_per_weight_version():
    """ue8m0 weight_scale_inv (DeepSeek-V3.1's scale format) is converted to fp32 once, not per call."""
    experts = torch.nn.Module()
    experts.gate_up_proj_scale_inv = torch.nn.Parameter(
        torch.tensor([[[0.5, 2.0]]]).to(torch.float8_e8m0fnu), requires_grad=False
    )
    first = mkt._fp32_scales(experts, "gate_up")
    assert first.dtype == torch.float32 and first.tolist() == [[[0.5, 2.0]]]
    assert mkt._fp32_scales(experts, "gate_up") is first
    with torch.no_grad():  # as load_state_dict writes a weight
        experts.gate_up_proj_scale_inv.copy_(torch.tensor([[[4.0, 8.0]]]).to(torch.float8_e8m0fnu))
    assert mkt._fp32_scales(experts, "gate_up").tolist() == [[[4.0, 8.0]]]  # a new weight version


def test_moe_from_transformers_rejects_gpt_oss():
    with pytest.raises(Unsupported, match="GPT-OSS"):
        MoE.from_transformers(moe_blocks(tiny_model("gpt_oss"))[0])


def test_deepseek_state_dict_names_match():
    block = moe_blocks(tiny_model("deepseek_v3"))[0]
    moe = MoE.from_config(
        "deepseek_v3",
        hidden_size=128,
        intermediate_size=128,
        shared_intermediate_size=128,
        device="meta",
        router=MoE.from_transformers(block).router_preset,
    )
    assert set(moe.state_dict()) == set(block.state_dict())


# ------------------------------------------------------------------------------------------------
# Hopper: the kernels inside the models
# ------------------------------------------------------------------------------------------------


def _cuda_model(family, **sizes):
    return tiny_model(family, device="cuda", **sizes)


@requires_sm90
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_gpu_patch_matches(family):
    model = _cuda_model(family)
    ids = prompt(device="cuda")
    before = patch_and_compare(model, ids, family)
    mkt.unpatch(model)
    assert torch.equal(logits(model, ids), before)


@requires_sm90
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_gpu_greedy_generate(family):
    """20 greedy tokens. They must be identical until a step where the unpatched model's two best
    logits are closer than 3x the largest logit difference between the two models on the prompt
    (a near-tie that bf16 rounding may flip); after a flip the sequences may differ."""
    model = _cuda_model(family)
    ids = prompt(batch=1, length=6, device="cuda")
    kw = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        base = model.generate(ids, **kw)
        prompt_before = logits(model, ids)
        mkt.patch(model)
        ours = model.generate(ids, **kw)
        flip_tol = 3 * (logits(model, ids) - prompt_before).abs().max().item()
    mkt.unpatch(model)
    a, b = base.sequences[0, ids.shape[1] :], ours.sequences[0, ids.shape[1] :]
    differ = (a != b).nonzero()
    if len(differ):
        step = int(differ[0])
        top2 = base.scores[step][0].float().topk(2).values
        assert float(top2[0] - top2[1]) <= flip_tol, (
            f"{family}: tokens differ at step {step} without a near-tie"
        )


@requires_sm90
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_gpu_zero_tokens_and_graph_capture(family):
    model = _cuda_model(family)
    mkt.patch(model)
    block = moe_blocks(model)[-1]
    with torch.no_grad():
        empty = block(torch.empty(1, 0, 128, dtype=torch.bfloat16, device="cuda"))
        assert empty.shape == (1, 0, 128)
        static = torch.randn(1, 16, 128, dtype=torch.bfloat16, device="cuda")
        graph, out = capture_cuda_graph(lambda: block(static))
        for seed in range(3):
            static.copy_(
                torch.randn(1, 16, 128, generator=torch.Generator().manual_seed(seed)).bfloat16().cuda()
            )
            graph.replay()
            assert torch.equal(out, block(static)), f"{family}: replay {seed}"


FP8_NOT_CONVERTED = [
    "lm_head",
    r"model\.layers\.\d+\.self_attn",
    r".*shared_experts",
    r"model\.layers\.0\.mlp",
]


@requires_sm90
def test_gpu_fp8_checkpoint_against_dequantised(tmp_path):
    """A tiny DeepSeek-V3 saved in bf16 and reloaded with transformers' fine-grained FP8 quantisation
    (every quantised dim >= 256 and a multiple of 128) runs our FP8 grouped GEMMs on its e4m3 weights;
    the same model with those weights dequantised to bf16 is the reference."""
    pytest.importorskip("accelerate", reason="transformers' FP8 quantisation needs accelerate")
    from moe_kernels.reference import dequantize_fp8

    sizes = dict(hidden=256, intermediate=256, experts=16, top_k=4)
    tiny_model("deepseek_v3", **sizes).save_pretrained(tmp_path)
    quant = transformers.FineGrainedFP8Config(modules_to_not_convert=FP8_NOT_CONVERTED)
    fp8_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, device_map="cuda", experts_implementation=mkt.IMPLEMENTATION
    ).eval()
    experts = moe_blocks(fp8_model)[-1].experts
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and type(experts).__name__ == "FP8Experts"
    reference = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    )
    with torch.no_grad():
        for ours, theirs in zip(moe_blocks(fp8_model), moe_blocks(reference), strict=True):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(ours.experts, name)
                s = getattr(ours.experts, f"{name}_scale_inv")
                getattr(theirs.experts, name).copy_(dequantize_fp8(w, s.float(), torch.bfloat16))
    ids = prompt(device="cuda")
    err = rel_error(logits(fp8_model, ids), logits(reference, ids))
    assert err <= 6e-2, f"FP8 model vs its dequantised weights: {err:.3e}"


@requires_sm90
@pytest.mark.parametrize("family, fp8_tol", [("deepseek_v3", 6e-2), ("qwen3_moe", 8e-2)])
def test_gpu_real_dims_against_transformers(family, fp8_tol):
    block = real_block(family)
    x = torch.randn(4096, block.experts.gate_up_proj.shape[2], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = block(x[None])[0].float()
        ours = MoE.from_transformers(block)
        bf16_err = rel_error(ours(x).float(), theirs)
        fp8_err = rel_error(ours.quantize_()(x).float(), theirs)
    assert bf16_err <= 1e-2, f"{family} bf16: {bf16_err:.3e}"
    assert fp8_err <= fp8_tol, f"{family} FP8: {fp8_err:.3e}"
