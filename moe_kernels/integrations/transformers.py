"""moe_kernels inside Hugging Face transformers (5.7+) MoE models: ``patch(model)`` / ``unpatch(model)``.

Importing this module registers an experts implementation named "moe_kernels" in transformers'
experts registries (bf16 and fine-grained FP8), so it can also be chosen at load time:
``from_pretrained(..., experts_implementation="moe_kernels")``. ``patch`` selects it on a loaded
model and, where the semantics match exactly, replaces each router's forward with the fused router:
DeepSeek-V3 / Kimi-K2, DeepSeek-V2, Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE. GPT-OSS is not supported
(see ``transformers_blocks.UNSUPPORTED_FAMILIES``).

What runs where:
- bf16 experts: permute -> bf16 grouped GEMMs + SwiGLU -> weighted combine, all on the device.
- FP8 experts (``FineGrainedFP8Config``, e4m3 weights with 128x128 ``weight_scale_inv``, as in
  DeepSeek-V3's checkpoints): permute with fused 1x128 quantisation -> FP8 grouped GEMMs, on those
  weights directly (transformers' own FP8 math needs a kernel downloaded from the Hub).
- Anything the kernels do not compute exactly (a layout, bias or activation they lack, a dtype other
  than bf16, a GPU other than Hopper) keeps transformers' implementation, with one warning that
  names it.
- Training: bf16 experts train end to end (dgrad and wgrad grouped GEMMs, the SwiGLU backward, the
  router's and the combine's gradients); FP8 experts are frozen and pass their input's gradient.
"""

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8ExpertsInterface
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from moe_kernels.layers.expert_mlp import routed_expert_mlp
from moe_kernels.layers.moe import gate_logits
from moe_kernels.layers.transformers_blocks import (
    UNSUPPORTED_FAMILIES,
    RouterSpec,
    Unsupported,
    describe_experts,
    describe_router,
    fp32_scales,
)
from moe_kernels.ops.permute import unpermute
from moe_kernels.ops.router import router as fused_router

IMPLEMENTATION = "moe_kernels"

__all__ = ["IMPLEMENTATION", "is_patched", "patch", "unpatch"]


# ------------------------------------------------------------------------------------------------
# The experts implementation
# ------------------------------------------------------------------------------------------------


def _kernels_run_on(device: torch.device) -> bool:
    """CPU: the ops' reference path. CUDA: the kernels need Hopper (sm_90)."""
    return device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    )


def _experts_kind(experts: nn.Module) -> str:
    """ "bf16", "fp8", or the reason the kernels cannot compute this module (cached on it)."""
    kind = experts.__dict__.get("_moe_kernels_kind")
    if kind is None:
        try:
            kind = describe_experts(experts)
        except Unsupported as e:
            kind = str(e)
        experts.__dict__["_moe_kernels_kind"] = kind
    return kind


def _call_reason(experts: nn.Module, kind: str, hidden_states: torch.Tensor) -> str | None:
    """Why this call cannot run on the kernels (None if it can)."""
    if kind not in ("bf16", "fp8"):
        return kind
    if hidden_states.dtype != torch.bfloat16:
        return f"{type(experts).__name__}: activations are {hidden_states.dtype}, the kernels take bfloat16"
    if not _kernels_run_on(hidden_states.device):
        return f"{type(experts).__name__}: device {hidden_states.device} is not a Hopper GPU (sm_90)"
    return None


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """One warning per key (a reason): patch names the modules first, later calls stay quiet."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _fallback(experts: nn.Module, reason: str, *args) -> torch.Tensor:
    """transformers' implementation that was selected before patching (default: grouped_mm)."""
    fp8 = experts.gate_up_proj.dtype == torch.float8_e4m3fn
    impl = experts.__dict__.get("_moe_kernels_fallback")
    impl = "grouped_mm" if impl in (None, IMPLEMENTATION) else impl
    _warn_once(reason, f"moe_kernels: {reason}; using transformers' '{impl}' experts implementation instead")
    if impl == "eager":
        return type(experts).forward.__wrapped__(experts, *args)
    interface = ALL_FP8_EXPERTS_FUNCTIONS if fp8 else ALL_EXPERTS_FUNCTIONS
    return interface.get_interface(impl, None)(experts, *args)


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts signature: hidden_states [T, H], top_k_index [T, k] (int64; under
    transformers' expert parallelism a sentinel id E marks dropped slots), top_k_weights [T, k]
    (fp32 or the model dtype) -> [T, H] in hidden_states' dtype."""
    kind = _experts_kind(self)
    reason = _call_reason(self, kind, hidden_states)
    if reason is not None:
        return _fallback(self, reason, hidden_states, top_k_index, top_k_weights)
    num_experts = self.gate_up_proj.shape[0]
    scales = {}
    if kind == "fp8":
        scales = dict(
            w_gate_up_scales=_fp32_scales(self, "gate_up"), w_down_scales=_fp32_scales(self, "down")
        )
    # Ids are validated against E + 1 experts with E local ones: the sentinel E is dropped.
    y, row_map = routed_expert_mlp(
        hidden_states,
        top_k_index,
        num_experts + 1,
        self.gate_up_proj,
        self.down_proj,
        num_local_experts=num_experts,
        **scales,
    )
    return unpermute(y, row_map, top_k_weights)


def _fp32_scales(experts: nn.Module, proj: str) -> torch.Tensor:
    """experts.<proj>_proj_scale_inv as fp32. fp32 scales are used as they are; ue8m0 ones are
    converted once per weight version and cached on the module, not once per call."""
    scales = getattr(experts, f"{proj}_proj_scale_inv")
    if scales.dtype == torch.float32:
        return scales
    key = (scales.data_ptr(), scales._version)
    cached = experts.__dict__.setdefault("_moe_kernels_fp32_scales", {})
    if cached.get(proj, (None,))[0] != key:
        cached[proj] = (key, fp32_scales(scales))
    return cached[proj][1]


def register() -> None:
    """Add "moe_kernels" to both of transformers' experts registries (idempotent). The FP8 registry
    is separate: without it an FP8 model accepts the name and then fails in forward."""
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    FP8ExpertsInterface.register(IMPLEMENTATION, experts_forward)


register()


# ------------------------------------------------------------------------------------------------
# The fused router
# ------------------------------------------------------------------------------------------------


def fused_router_forward(self: nn.Module, hidden_states: torch.Tensor):
    """A transformers router's forward on the fused router: (router_logits [T, E], top_k_weights
    [T, k] in the family's dtype, top_k_index int64 [T, k]), as the original returns."""
    spec: RouterSpec = self._moe_kernels_router
    original = type(self).__mro__[1]
    x = hidden_states.reshape(-1, self.weight.shape[1])
    if not _kernels_run_on(x.device):
        return original.forward(self, hidden_states)
    p = spec.preset
    logits = gate_logits(x, self.weight, spec.logits_fp32)
    bias = self.e_score_correction_bias.float() if p.uses_bias else None
    weights, ids, _ = fused_router(logits, p.top_k, bias=bias, **p.router_kwargs())
    if spec.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return logits, weights, ids.long()


_fused_classes: dict[type, type] = {}


def _fused_router_class(cls: type) -> type:
    """A subclass of the router's class with the fused forward: isinstance checks (transformers'
    output recorders) still hold, and unpatch restores the class."""
    if cls not in _fused_classes:
        _fused_classes[cls] = type(f"MoEKernels{cls.__name__}", (cls,), {"forward": fused_router_forward})
    return _fused_classes[cls]


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------


@dataclass
class _PatchState:
    experts_implementation: dict  # model.get_experts_implementation() before patching
    routers: list = field(default_factory=list)  # (module, original class)
    experts: list = field(default_factory=list)  # experts modules given a fallback


def _is_experts(module: nn.Module) -> bool:
    return (
        hasattr(type(module).forward, "__wrapped__")
        and hasattr(module, "down_proj")
        and hasattr(module, "config")
    )


def _is_router(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("TopkRouter", "TopKRouter")) and hasattr(module, "weight")


def _warn_unsupported(kind: str, names_by_reason: dict[str, list[str]]) -> None:
    for reason, names in names_by_reason.items():
        who = names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        _warn_once(
            reason, f"moe_kernels.patch: {who} keep{'' if len(names) > 1 else 's'} its {kind}: {reason}"
        )


def patch(model: nn.Module, *, routers: bool = True) -> nn.Module:
    """Run a loaded transformers MoE model on moe_kernels, in place; returns the model.

    Selects the "moe_kernels" experts implementation (bf16 or FP8 experts) and, with routers=True,
    swaps each router whose semantics the fused router reproduces exactly for it. Modules the kernels
    cannot compute exactly keep their forward, with one warning per kind naming them. ``unpatch``
    restores the model as it was (bit-identical outputs)."""
    if is_patched(model):
        return model
    state = _PatchState(experts_implementation=model.get_experts_implementation())
    unsupported: dict[str, dict[str, list[str]]] = {"forward": {}, "experts implementation": {}, "router": {}}
    for name, module in model.named_modules():
        family_reason = UNSUPPORTED_FAMILIES.get(type(_parent(model, name)).__name__)
        if type(module).__name__ in UNSUPPORTED_FAMILIES:
            reason = UNSUPPORTED_FAMILIES[type(module).__name__]
            unsupported["forward"].setdefault(reason, []).append(name or type(module).__name__)
        elif _is_experts(module):
            module.__dict__["_moe_kernels_fallback"] = module.config._experts_implementation
            module.__dict__["_moe_kernels_kind"] = family_reason  # None: described on first use
            state.experts.append(module)
            kind = _experts_kind(module)
            if kind not in ("bf16", "fp8") and family_reason is None:
                unsupported["experts implementation"].setdefault(kind, []).append(name)
        elif routers and _is_router(module) and family_reason is None:
            try:
                module.__dict__["_moe_kernels_router"] = describe_router(module)
            except Unsupported as e:
                unsupported["router"].setdefault(str(e), []).append(name)
                continue
            state.routers.append((module, type(module)))
            module.__class__ = _fused_router_class(type(module))
    for kind, by_reason in unsupported.items():
        _warn_unsupported(kind, by_reason)
    model.config._experts_implementation = IMPLEMENTATION  # the setter recurses into sub-configs
    model.__dict__["_moe_kernels_patch"] = state
    return model


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0]) if name else model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the previous experts implementation and the original router classes."""
    state: _PatchState | None = model.__dict__.pop("_moe_kernels_patch", None)
    if state is None:
        return model
    for module, cls in state.routers:
        module.__class__ = cls
        module.__dict__.pop("_moe_kernels_router", None)
    for module in state.experts:
        module.__dict__.pop("_moe_kernels_fallback", None)
        module.__dict__.pop("_moe_kernels_kind", None)
    model.config._experts_implementation = state.experts_implementation
    return model


def is_patched(model: nn.Module) -> bool:
    return "_moe_kernels_patch" in model.__dict__
