"""What a transformers 5.x MoE block, router or experts module holds, read by attribute.

No transformers import: ``MoE.from_transformers`` and ``moe_kernels.integrations.transformers`` both
read modules through these descriptions. Each ``describe_*`` returns a description, or raises
``Unsupported`` with the reason the fused ops cannot reproduce the module exactly.
(Semantics per family: ../shared/transformers-integration.md §2.)
"""

from dataclasses import dataclass

import torch
from torch import nn

from moe_kernels import reference
from moe_kernels._checks import FP8, QUANT_BLOCK
from moe_kernels.layers.parts import is_silu
from moe_kernels.presets import RouterPreset


class Unsupported(ValueError):
    """The module's semantics differ from what the fused ops compute; the message says how."""


@dataclass(frozen=True)
class RouterSpec:
    """A transformers router as the fused router's arguments."""

    preset: RouterPreset
    logits_fp32: bool  # gate linear in fp32 (DeepSeek) or in the model dtype (the others)
    weights_in_logits_dtype: bool  # the routing weights are rounded to the logits' dtype (Qwen, OLMoE)


@dataclass
class BlockSpec:
    hidden_size: int
    intermediate_size: int
    router: RouterSpec
    shared_experts: nn.Module | None
    shared_expert_gate: nn.Module | None


UNSUPPORTED_FAMILIES = {
    "GptOssMLP": "GPT-OSS: its router takes the softmax of the top-k logits after a router bias, and its "
    "experts are transposed, interleaved, carry biases and use a clamped SwiGLU; the fused ops "
    "compute none of these",
}


def _softmax_router(top_k, num_experts, renormalize, logits_fp32=False, weights_in_logits_dtype=True):
    preset = RouterPreset(num_experts=num_experts, top_k=top_k, score_func="softmax", renormalize=renormalize)
    return RouterSpec(preset, logits_fp32, weights_in_logits_dtype)


def describe_router(gate: nn.Module) -> RouterSpec:
    """The fused-router arguments that reproduce ``gate.forward`` (ties aside: ours go to the lower
    expert index, torch.topk's are unspecified)."""
    name = type(gate).__name__
    if name == "DeepseekV3TopkRouter":
        preset = RouterPreset(
            num_experts=gate.num_experts,
            top_k=gate.top_k,
            score_func="sigmoid",
            uses_bias=True,
            num_groups=gate.num_group,
            topk_groups=gate.topk_group,
            group_score="top2_sum",
            renormalize=bool(gate.norm_topk_prob),
            scaling_factor=float(gate.routed_scaling_factor),
        )
        spec = RouterSpec(preset, logits_fp32=True, weights_in_logits_dtype=False)
    elif name == "DeepseekV2TopkRouter":
        groups = {"greedy": (1, 1), "group_limited_greedy": (gate.num_group, gate.topk_group)}
        if gate.topk_method not in groups:
            raise Unsupported(
                f"{name}: topk_method={gate.topk_method!r} (transformers itself supports none but "
                "'greedy' and 'group_limited_greedy')"
            )
        num_groups, topk_groups = groups[gate.topk_method]
        # transformers masks the dropped groups' scores to 0, the fused router to -inf: the same picks
        # whenever the kept groups hold top_k experts with scores above 0 (the checks below).
        preset = RouterPreset(
            num_experts=gate.num_experts,
            top_k=gate.top_k,
            score_func="softmax",
            num_groups=num_groups,
            topk_groups=topk_groups,
            group_score="max",
            renormalize=False,
            scaling_factor=float(gate.routed_scaling_factor),
        )
        spec = RouterSpec(preset, logits_fp32=True, weights_in_logits_dtype=False)
    elif name in ("Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter"):
        spec = _softmax_router(gate.top_k, gate.num_experts, bool(gate.norm_topk_prob))
    elif name == "MixtralTopKRouter":
        spec = _softmax_router(gate.top_k, gate.num_experts, True, weights_in_logits_dtype=False)
    else:
        raise Unsupported(f"{name}: not a router family the fused router reproduces")
    p = spec.preset
    try:
        reference.check_router_args(
            name,
            torch.empty(0, p.num_experts, device="meta"),
            p.top_k,
            None,
            p.score_func,
            p.num_groups,
            p.topk_groups,
            p.group_score,
        )
    except ValueError as e:
        raise Unsupported(str(e)) from None
    return spec


def describe_experts(experts: nn.Module) -> str:
    """ "bf16" or "fp8" when the grouped GEMMs compute ``experts`` exactly (gate_up [E, 2I, H] with
    gate rows first, down [E, H, I], SiLU, no biases, dims multiples of 128); else Unsupported."""
    name = type(experts).__name__
    layout = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True)
    for attr, want in layout.items():
        if getattr(experts, attr, want) != want:
            raise Unsupported(
                f"{name}: {attr}={getattr(experts, attr)} (the grouped GEMMs need {attr}={want})"
            )
    if not is_silu(getattr(experts, "act_fn", None)):
        raise Unsupported(f"{name}: activation {type(getattr(experts, 'act_fn', None)).__name__} is not SiLU")
    if any(getattr(experts, a, None) is not None for a in ("swiglu_limit", "swiglu_alpha", "limit")):
        raise Unsupported(f"{name}: clamped SwiGLU (swiglu_limit / swiglu_alpha) is not fused")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if gate_up.dim() != 3 or down.dim() != 3:
        raise Unsupported(
            f"{name}: expert weights must be 3-D, got {list(gate_up.shape)} and {list(down.shape)}"
        )
    e, two_i, h = gate_up.shape
    if tuple(down.shape) != (e, h, two_i // 2):
        raise Unsupported(
            f"{name}: down_proj {list(down.shape)} is not [E, H, I] for gate_up {list(gate_up.shape)}"
        )
    if h % QUANT_BLOCK or (two_i // 2) % QUANT_BLOCK:
        raise Unsupported(f"{name}: hidden {h} and intermediate {two_i // 2} must be multiples of 128")
    if gate_up.dtype == torch.bfloat16 and down.dtype == torch.bfloat16:
        return "bf16"
    if gate_up.dtype == FP8 and down.dtype == FP8:
        block = tuple(getattr(experts, "block_size", None) or ())
        if block != (QUANT_BLOCK, QUANT_BLOCK):
            raise Unsupported(f"{name}: FP8 block size {block} (the FP8 grouped GEMM needs (128, 128))")
        if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
            raise Unsupported(f"{name}: activation_scheme={experts.activation_scheme!r} (only 'dynamic')")
        return "fp8"
    raise Unsupported(f"{name}: weights {gate_up.dtype} / {down.dtype} (need bfloat16 or float8_e4m3fn)")


def fp32_scales(scales: torch.Tensor) -> torch.Tensor:
    """transformers' weight_scale_inv as fp32 (ue8m0 scales are converted, fp32 ones shared)."""
    return scales if scales.dtype == torch.float32 else scales.float()


def describe_block(block: nn.Module) -> BlockSpec:
    """The MoE layer a transformers block computes (raises Unsupported otherwise)."""
    name = type(block).__name__
    if name in UNSUPPORTED_FAMILIES:
        raise Unsupported(UNSUPPORTED_FAMILIES[name])
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None:
        raise Unsupported(f"{name}: not a transformers MoE block (no gate and experts)")
    router = describe_router(gate)
    describe_experts(experts)
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    return BlockSpec(
        hidden_size=experts.gate_up_proj.shape[2],
        intermediate_size=experts.gate_up_proj.shape[1] // 2,
        router=router,
        shared_experts=shared,
        shared_expert_gate=getattr(block, "shared_expert_gate", None),
    )
