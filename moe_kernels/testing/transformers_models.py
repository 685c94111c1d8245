"""Tiny transformers MoE models built offline from configs (no downloads), for tests and examples.

Dims are multiples of 128 (the grouped GEMMs' K and N) with H != 2I, so a swapped layout shows up.
Weights are redrawn with a larger std than transformers' init so the routing is far from uniform,
and every expert-bias vector transformers zero-initialises gets random non-zero values.
"""

import torch
import transformers

FAMILIES = ("deepseek_v3", "kimi_k2", "deepseek_v2", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss")
SUPPORTED_FAMILIES = FAMILIES[:-1]  # GPT-OSS keeps transformers' forward (transformers_blocks.py says why)


def tiny_config(
    family: str,
    *,
    hidden: int = 128,
    intermediate: int = 128,
    experts: int = 16,
    top_k: int = 4,
    layers: int = 2,
    vocab: int = 128,
):
    """A transformers config of `family` with one MoE layer per decoder layer (DeepSeek: all but the
    first, which is dense)."""
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    mla = dict(
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, num_key_value_heads=4
    )
    if family in ("deepseek_v3", "kimi_k2"):
        groups = dict(n_group=4, topk_group=2) if family == "deepseek_v3" else dict(n_group=1, topk_group=1)
        return transformers.DeepseekV3Config(
            **common,
            **mla,
            **groups,
            intermediate_size=2 * hidden,
            moe_intermediate_size=intermediate,
            n_routed_experts=experts,
            n_shared_experts=1,
            num_experts_per_tok=top_k,
            routed_scaling_factor=2.5 if family == "deepseek_v3" else 2.827,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            q_lora_rank=64,
        )
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **common,
            **mla,
            intermediate_size=2 * hidden,
            moe_intermediate_size=intermediate,
            n_routed_experts=experts,
            n_shared_experts=2,
            num_experts_per_tok=top_k,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=16.0,
            first_k_dense_replace=1,
            q_lora_rank=None,
        )
    if family in ("qwen2_moe", "qwen3_moe"):
        extra = (
            dict(shared_expert_intermediate_size=2 * intermediate)
            if family == "qwen2_moe"
            else dict(head_dim=32)
        )
        config_class = transformers.Qwen2MoeConfig if family == "qwen2_moe" else transformers.Qwen3MoeConfig
        return config_class(
            **common,
            **extra,
            intermediate_size=2 * hidden,
            moe_intermediate_size=intermediate,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=family == "qwen3_moe",
            num_key_value_heads=2,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=intermediate,
            num_local_experts=experts,
            num_experts_per_tok=2,
            num_key_value_heads=2,
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(
            **common,
            intermediate_size=intermediate,
            num_experts=experts,
            num_experts_per_tok=top_k,
            num_key_value_heads=4,
        )
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            **common,
            intermediate_size=intermediate,
            num_local_experts=experts,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=8,
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Redraw every weight ~ N(0, std) and every bias (router and expert-score biases included) ~
    N(0, 0.1), deterministically from `seed`."""
    gens: dict[torch.device, torch.Generator] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        gen = gens.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed))
        if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn:
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            continue
        is_bias = t.dim() == 1 and ("bias" in name)
        if t.dim() >= 2 or is_bias:
            # One fp32 temporary, scaled in place: a real DeepSeek-V3 block's experts are 28 GB of it.
            t.copy_(torch.randn(t.shape, generator=gen, device=t.device).mul_(0.1 if is_bias else std))
    return model


def tiny_model(family: str, *, dtype=torch.bfloat16, device="cpu", seed: int = 0, **sizes):
    """A tiny randomly initialised causal LM of `family` (see tiny_config) in eval mode."""
    config = tiny_config(family, **sizes)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return randomise_(model, seed).to(device).eval()


def real_block(family: str, device="cuda", seed: int = 0) -> torch.nn.Module:
    """transformers' MoE block of a released model ("deepseek_v3" or "qwen3_moe", the sizes of
    moe_kernels.MODEL_PRESETS) in bf16 with grouped_mm experts, weights ~ N(0, 0.02) and a non-zero
    expert bias, drawn on `device`."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moe_kernels.presets import MODEL_PRESETS

    preset = MODEL_PRESETS[family]
    p = preset.router_preset
    sizes = dict(hidden_size=preset.hidden_size, moe_intermediate_size=preset.intermediate_size)
    if family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **sizes,
            n_routed_experts=p.num_experts,
            num_experts_per_tok=p.top_k,
            n_shared_experts=preset.shared_intermediate_size // preset.intermediate_size,
            n_group=p.num_groups,
            topk_group=p.topk_groups,
            routed_scaling_factor=p.scaling_factor,
            norm_topk_prob=p.renormalize,
        )
        block_class = DeepseekV3MoE
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **sizes, num_experts=p.num_experts, num_experts_per_tok=p.top_k, norm_topk_prob=p.renormalize
        )
        block_class = Qwen3MoeSparseMoeBlock
    else:
        raise ValueError(f"real_block: family must be 'deepseek_v3' or 'qwen3_moe', got {family!r}")
    config._experts_implementation = "grouped_mm"
    # Built in bf16: fp32 parameters (45 GB for DeepSeek-V3's experts) converted afterwards left
    # 35 GB of torch's cache in segments it could not release, and randomise_'s 28 GB temporary
    # found no room on an 80 GB H100.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = block_class(config).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(default_dtype)
    return randomise_(block, seed=seed, std=0.02).eval()


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE blocks (modules with a router `gate` and `experts`) of a model, in order."""
    return [
        m for m in model.modules() if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))
    ]


class RoutingRecorder:
    """Records (router logits, top-k ids) of every router call of a model, through forward hooks on
    the router modules (they stay on a patched router: patch swaps the class, not the instance)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        routers = [getattr(b, "gate", None) or b.router for b in moe_blocks(model)]
        self._hooks = [r.register_forward_hook(self._record) for r in routers]

    def _record(self, module, args, output):
        self.calls.append((output[0].detach().float().cpu(), output[2].detach().cpu()))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def first_routing_flips(a: RoutingRecorder, b: RoutingRecorder, batch: int, seq: int) -> torch.Tensor:
    """For each sequence of a [batch, seq] run recorded twice, the first position where any router
    picked a different set of experts in the two runs (seq if none). Each such flip must be a
    near-tie in run a: the swapped experts' logits within 2% of the token's largest |logit| (bf16
    logits round to 2^-8 relative, and the input of a later layer differs at bf16 rounding level)."""
    first = torch.full((batch,), seq)
    for (logits, ids_a), (_, ids_b) in zip(a.calls, b.calls, strict=True):
        sa, sb = ids_a.sort(-1).values, ids_b.sort(-1).values
        for token in (sa != sb).any(-1).nonzero().flatten().tolist():
            swapped = set(sa[token].tolist()) ^ set(sb[token].tolist())
            values = logits[token, sorted(swapped)]
            spread = float(values.max() - values.min())
            assert spread <= 0.02 * float(logits[token].abs().max()), (
                f"token {token}: experts {sorted(swapped)} swapped, logits {values.tolist()}: not a near-tie"
            )
            row, pos = divmod(token, seq)
            first[row] = min(int(first[row]), pos)
    return first
