"""Router settings of the MoE models this package targets (DESIGN.md §2).

Each preset gives the arguments of ``router`` (and of ``moe_kernels.reference.router``) plus the
model's expert count; ``uses_bias`` says whether the model carries an expert-bias vector for
auxiliary-loss-free balancing (pass it as ``bias=``).
"""

from dataclasses import asdict, dataclass


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
        """Keyword arguments of ``router`` (everything but num_experts, top_k and uses_bias)."""
        kwargs = asdict(self)
        for key in ("num_experts", "top_k", "uses_bias"):
            del kwargs[key]
        return kwargs


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
}
