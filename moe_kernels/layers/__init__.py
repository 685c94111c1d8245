"""Layers built from the ops: the expert MLP and the DeepSeekMoE nn.Module.

Import rule: integrations -> layers -> {ops, distributed} -> _C (reference, _checks and presets
import nothing above them)."""

from moe_kernels.layers.expert_mlp import expert_mlp
from moe_kernels.layers.moe import BalanceLoss, MoE
from moe_kernels.layers.parts import FP8SwiGLUMLP, SwiGLUMLP

__all__ = ["BalanceLoss", "FP8SwiGLUMLP", "MoE", "SwiGLUMLP", "expert_mlp"]
