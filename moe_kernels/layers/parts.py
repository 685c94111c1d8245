"""The parameter-holding parts of the MoE layer: the router's gate, the routed experts, and the
shared experts (bf16 SwiGLU MLP, or FP8 after ``MoE.quantize_``). Names follow transformers 5.x."""

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels._checks import FP8, QUANT_BLOCK, check
from moe_kernels.layers.expert_mlp import expert_mlp
from moe_kernels.layers.fp8_training import fp8_expert_mlp
from moe_kernels.ops.quant import quantize_fp8, quantize_fp8_weight


def is_silu(act) -> bool:
    """nn.SiLU, or transformers' SiLUActivation (ACT2FN["silu"])."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def frozen(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


class SwiGLUMLP(nn.Module):
    """down(SiLU(gate(x)) * up(x)): the shared experts (transformers' DeepseekV3MLP layout)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKGate(nn.Module):
    """The router's parameters: ``weight`` [E, H] and, for bias-balanced models, the fp32 expert
    bias ``e_score_correction_bias`` [E] (added to the scores for selection only)."""

    def __init__(self, hidden_size: int, num_experts: int, expert_bias: bool, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        bias = torch.zeros(num_experts, dtype=torch.float32, device=device) if expert_bias else None
        self.register_buffer("e_score_correction_bias", bias)


class Experts(nn.Module):
    """Routed expert weights: gate_up_proj [E, 2I, H], down_proj [E, H, I]; bf16, or e4m3 with
    ``*_scale_inv`` fp32 128x128 block scales (DeepSeek-V3 checkpoints, transformers' FP8Experts)."""

    def __init__(self, num_experts, hidden_size, intermediate_size, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.register_parameter("gate_up_proj_scale_inv", None)  # FP8 only (set_fp8)
        self.register_parameter("down_proj_scale_inv", None)

    @property
    def is_fp8(self) -> bool:
        return self.gate_up_proj.dtype == FP8

    def mlp_kwargs(self) -> dict:
        """The weight arguments of ``expert_mlp``."""
        scales = {}
        if self.is_fp8:
            scales = dict(
                w_gate_up_scales=self.gate_up_proj_scale_inv, w_down_scales=self.down_proj_scale_inv
            )
        return dict(w_gate_up=self.gate_up_proj, w_down=self.down_proj, **scales)

    def set_fp8(self, gate_up, gate_up_scales, down, down_scales) -> None:
        """Hold FP8 weights (e4m3 + fp32 128x128 scales) in place of the current ones."""
        self.gate_up_proj, self.gate_up_proj_scale_inv = frozen(gate_up), frozen(gate_up_scales)
        self.down_proj, self.down_proj_scale_inv = frozen(down), frozen(down_scales)


class FP8SwiGLUMLP(nn.Module):
    """A SwiGLU MLP with e4m3 weights and fp32 128x128 scales (DeepSeek-V3's FP8 recipe for every
    linear layer but the gate), run as a one-expert ``expert_mlp``: the tokens are quantised 1x128,
    gate_up [1, 2I, H] (gate rows first) and down [1, H, I] go through the FP8 grouped GEMMs."""

    def __init__(self, gate_up, gate_up_scale_inv, down, down_scale_inv):
        super().__init__()
        self.gate_up_proj, self.gate_up_proj_scale_inv = frozen(gate_up), frozen(gate_up_scale_inv)
        self.down_proj, self.down_proj_scale_inv = frozen(down), frozen(down_scale_inv)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, *, pow2_scale: bool = False) -> "FP8SwiGLUMLP":
        """From a module with gate_proj / up_proj / down_proj linears and SiLU (SwiGLUMLP,
        transformers' DeepseekV3MLP / Qwen2MoeMLP): bf16 weights are quantised; FP8 ones
        (transformers' FP8Linear, e4m3 weight + weight_scale_inv in 128x128 blocks) are taken as they
        are. The module itself is left untouched."""
        op = "FP8SwiGLUMLP.from_mlp"
        linears = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        check(all(lin is not None for lin in linears), op, f"{type(mlp).__name__} has no gate/up/down_proj")
        check(
            is_silu(getattr(mlp, "act_fn", nn.SiLU())), op, f"{type(mlp).__name__}'s activation is not SiLU"
        )
        for lin in linears:
            check(getattr(lin, "bias", None) is None, op, "the linears must have no bias")
            check(
                lin.weight.shape[0] % QUANT_BLOCK == 0 and lin.weight.shape[1] % QUANT_BLOCK == 0,
                op,
                f"weights must be multiples of 128 in both dims, got {list(lin.weight.shape)}",
            )
        gate, up, down = linears
        if gate.weight.dtype == FP8:
            for lin in linears:
                block = tuple(getattr(lin, "block_size", None) or (QUANT_BLOCK, QUANT_BLOCK))
                check(
                    block == (QUANT_BLOCK, QUANT_BLOCK), op, f"FP8 block size must be (128, 128), got {block}"
                )
            gate_up = torch.cat([gate.weight, up.weight])[None]
            gate_up_scales = torch.cat([gate.weight_scale_inv, up.weight_scale_inv]).float()[None]
            return cls(
                gate_up,
                gate_up_scales,
                down.weight[None].clone(),
                down.weight_scale_inv.float()[None].clone(),
            )
        gate_up = quantize_fp8_weight(
            torch.cat([gate.weight, up.weight]).detach()[None], pow2_scale=pow2_scale
        )
        return cls(*gate_up, *quantize_fp8_weight(down.weight.detach()[None], pow2_scale=pow2_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        if tokens == 0:
            return x.new_empty((0, self.down_proj.shape[1]), dtype=torch.bfloat16)
        # Offsets [0, T] made on the device from a host-known T (no copy from the host: graph-safe).
        offsets = torch.arange(0, 2 * tokens, tokens, dtype=torch.int32, device=x.device)
        scales = dict(w_gate_up_scales=self.gate_up_proj_scale_inv, w_down_scales=self.down_proj_scale_inv)
        if torch.is_grad_enabled() and x.requires_grad:
            # The weights stay frozen; x's gradient goes through DeepSeek-V3's FP8 recipe, as for the
            # routed FP8 experts (the same forward: tokens quantised 1x128, then the FP8 GEMMs).
            return fp8_expert_mlp(x, offsets, self.gate_up_proj, self.down_proj, **scales)
        x_q, x_scales = quantize_fp8(x)
        return expert_mlp(x_q, offsets, self.gate_up_proj, self.down_proj, x_scales=x_scales, **scales)
