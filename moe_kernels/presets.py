"""Settings of the MoE models this package targets (DESIGN.md §2): their routers and layer sizes.

A RouterPreset gives the arguments of ``router`` (and of ``moe_kernels.reference.router``) plus the
model's expert count; ``uses_bias`` says whether the model carries an expert-bias vector for
auxiliary-loss-free balancing (pass it as ``bias=``). A ModelPreset adds the sizes of one MoE layer
(``MoE.from_config``, the tests and the benchmarks share them).
"""

from dataclasses import dataclass, fields

_NOT_ROUTER_ARGS = ("num_experts", "top_k", "uses_bias")


@dataclass(frozen=True)
class RouterPreset:
    num_experts: int
    top_k: int
    score_func: str  # "softmax" or "sigmoid"
    uses_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"  # "top2_sum" (DeepSeek-V3) or "max" (DeepSeek-V2)
    renormalize: bool = True
    scaling_factor: float = 1.0

    def router_kwargs(self) -> dict:
        """Keyword arguments of ``router`` (everything but num_experts, top_k and uses_bias). A plain
        dict of the fields (not ``asdict``, which deep-copies): cheap enough to call per forward."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_ROUTER_ARGS}


PRESETS: dict[str, RouterPreset] = {
    "deepseek_v3": RouterPreset(
        num_experts=256,
        top_k=8,
        score_func="sigmoid",
        uses_bias=True,
        num_groups=8,
        topk_groups=4,
        group_score="top2_sum",
        renormalize=True,
        scaling_factor=2.5,
    ),
    "deepseek_v2": RouterPreset(
        num_experts=160,
        top_k=6,
        score_func="softmax",
        num_groups=8,
        topk_groups=3,
        group_score="max",
        renormalize=False,
        scaling_factor=16.0,
    ),
    "deepseek_moe_16b": RouterPreset(num_experts=64, top_k=6, score_func="softmax", renormalize=False),
    "qwen3_moe": RouterPreset(num_experts=128, top_k=8, score_func="softmax", renormalize=True),
    "mixtral": RouterPreset(num_experts=8, top_k=2, score_func="softmax", renormalize=True),
    "kimi_k2": RouterPreset(
        num_experts=384,
        top_k=8,
        score_func="sigmoid",
        uses_bias=True,
        renormalize=True,
        scaling_factor=2.827,
    ),
    "qwen2_moe": RouterPreset(num_experts=64, top_k=8, score_func="softmax", renormalize=False),
    "olmoe": RouterPreset(num_experts=64, top_k=8, score_func="softmax", renormalize=False),
}


@dataclass(frozen=True)
class ModelPreset:
    """One MoE layer of a released model: sizes, router and shared experts.

    The shared experts are one SwiGLU MLP of width ``shared_intermediate_size`` (DeepSeek merges its
    n shared experts into one MLP of n times the expert width); ``shared_expert_gate`` is Qwen2-MoE's
    sigmoid gate on that MLP's output.
    """

    router: str  # a key of PRESETS
    hidden_size: int
    intermediate_size: int  # per routed expert
    shared_intermediate_size: int = 0  # 0: no shared experts
    shared_expert_gate: bool = False
    logits_fp32: bool = False  # the gate linear in fp32 (DeepSeek's code) rather than the model dtype

    @property
    def router_preset(self) -> RouterPreset:
        return PRESETS[self.router]


MODEL_PRESETS: dict[str, ModelPreset] = {
    "deepseek_v3": ModelPreset("deepseek_v3", 7168, 2048, shared_intermediate_size=2048, logits_fp32=True),
    "kimi_k2": ModelPreset("kimi_k2", 7168, 2048, shared_intermediate_size=2048, logits_fp32=True),
    "deepseek_v2": ModelPreset(
        "deepseek_v2", 5120, 1536, shared_intermediate_size=2 * 1536, logits_fp32=True
    ),
    "deepseek_moe_16b": ModelPreset(
        "deepseek_moe_16b", 2048, 1408, shared_intermediate_size=2 * 1408, logits_fp32=True
    ),
    "qwen3_moe": ModelPreset("qwen3_moe", 2048, 768),  # Qwen3-30B-A3B
    "qwen2_moe": ModelPreset(  # Qwen2-57B-A14B
        "qwen2_moe", 3584, 2560, shared_intermediate_size=20480, shared_expert_gate=True
    ),
    "mixtral": ModelPreset("mixtral", 4096, 14336),  # Mixtral-8x7B
    "olmoe": ModelPreset("olmoe", 2048, 1024),  # OLMoE-1B-7B
}
