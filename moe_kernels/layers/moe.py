"""The DeepSeekMoE layer as an ``nn.Module`` (DESIGN.md §1), built from the package's ops.

    x ─► gate linear ─► router ─► permute (+FP8) ─► expert_mlp ─► unpermute (+ shared output) ─► y
    └──────────────► shared experts (on a side stream, overlapping the routed path) ──┘

Parameter names follow transformers 5.x (``gate.weight``, ``gate.e_score_correction_bias``,
``experts.gate_up_proj`` [E, 2I, H] gate rows first, ``experts.down_proj`` [E, H, I], FP8 adds
``*_scale_inv`` in 128x128 blocks, ``shared_experts.{gate,up,down}_proj``), so a DeepSeek-V3 block's
state dict loads as it is. In inference (no gradient needed) the forward never reads device data on
the host, so it can be captured in a CUDA graph.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels._checks import FP8, QUANT_BLOCK, check
from moe_kernels.distributed import all_reduce_counts
from moe_kernels.layers.expert_mlp import expert_mlp
from moe_kernels.layers.fp8_training import fp8_routed_expert_mlp, fp8_weight
from moe_kernels.layers.parts import Experts, FP8SwiGLUMLP, SwiGLUMLP, TopKGate
from moe_kernels.layers.transformers_blocks import describe_block, fp32_scales
from moe_kernels.ops.permute import permute, unpermute
from moe_kernels.ops.quant import quantize_fp8_weight
from moe_kernels.ops.router import balance_loss, router, update_expert_bias_
from moe_kernels.presets import MODEL_PRESETS, PRESETS, ModelPreset, RouterPreset


@dataclass(frozen=True)
class BalanceLoss:
    """Weights of the balance losses a training forward computes (0 = off; DESIGN.md §1).

    expert: alpha1 of the expert-level loss (DeepSeekMoE). device: alpha2 of the device-level loss
    over ``num_devices`` equal contiguous groups of experts (DeepSeek-V2). sequence: alpha of
    DeepSeek-V3's sequence-wise loss (sequences are the leading dims of a 3-D input, or
    ``seq_offsets`` given to forward).
    """

    expert: float = 0.0
    device: float = 0.0
    num_devices: int = 0
    sequence: float = 0.0


class MoE(nn.Module):
    """A DeepSeekMoE layer: fused router, routed experts (bf16 or FP8 grouped GEMMs), shared experts.

    Args:
        hidden_size: H, a multiple of 128.
        intermediate_size: I of each routed expert, a multiple of 128.
        router: a RouterPreset or a name in ``moe_kernels.PRESETS`` (experts E, top-K, score
            function, expert bias, groups, renormalisation, scaling; DESIGN.md §2).
        shared_intermediate_size: width of the shared-experts SwiGLU MLP (0 = none; DeepSeek merges
            n shared experts into one MLP n times wider).
        shared_expert_gate: Qwen2-MoE's gate: the shared output is scaled by sigmoid(x @ w), w [1, H].
        logits_fp32: compute the gate linear in fp32 (DeepSeek's reference code, transformers'
            DeepSeek-V2/V3) rather than in the input's dtype (Qwen, Mixtral, OLMoE). The router itself
            always computes in fp32.
        weights_dtype: round the routing weights to this dtype before the combine (transformers'
            Qwen2/3-MoE and OLMoE round them to the model dtype); None keeps fp32.
        balance_loss: BalanceLoss weights; the losses of a training forward are then in
            ``self.balance_losses`` (a dict) and their sum in ``self.aux_loss``.
        dtype, device: of the parameters (bf16: the only activation dtype of the grouped GEMMs).
        init_std: std of the normal initialisation of every weight (transformers' initializer_range).
        fp8_training: run the routed experts in FP8 on the bf16 weights, forward and backward
            (DeepSeek-V3's recipe, ``moe_kernels.layers.fp8_training``): the weights are quantised
            128x128 once per version (optimiser step), the activations and gradients 1x128; the
            weight gradients run as BF16 GEMMs on the dequantised cached activations, faster on the
            H200 (bench/results/train.json) than the FP8 wgrad with 128x1 operands, which
            ``moe.fp8_wgrad = True`` selects. Without fp8_training a training forward runs bf16
            GEMMs, forward and backward.
        expert_parallel: a ``moe_kernels.distributed.ExpertParallel`` over the router's E experts:
            this rank then holds only its experts (``expert_parallel.local_experts``, in that order,
            in ``self.experts``); the tokens go to the ranks that hold their experts and come back
            (dispatch / combine, FP8 rows when the experts are FP8), while the router, the shared
            experts and the balance statistics stay on this rank.

    The expert bias (routers with ``uses_bias``) is updated by ``update_bias`` from the counts a
    training forward accumulates in ``routed_counts``. ``quantize_()`` turns the routed experts into
    FP8. ``forward(x [..., H])`` returns x's shape; x is bf16; T = 0 works.

    Gradients: everything is differentiable (router, permute, grouped GEMMs and SwiGLU, unpermute,
    balance losses). Frozen FP8 experts (``quantize_()``, FP8 checkpoints) pass gradients to their
    input and get none. With expert parallelism the bf16 experts train; FP8 there is inference only.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        router: RouterPreset | str,
        *,
        shared_intermediate_size: int = 0,
        shared_expert_gate: bool = False,
        logits_fp32: bool = True,
        weights_dtype: torch.dtype | None = None,
        balance_loss: BalanceLoss | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        init_std: float = 0.02,
        fp8_training: bool = False,
        expert_parallel=None,
    ):
        super().__init__()
        preset = PRESETS[router] if isinstance(router, str) else router
        ep = expert_parallel
        if ep is not None:
            check(
                (ep.num_experts, ep.hidden_size, ep.top_k) == (preset.num_experts, hidden_size, preset.top_k),
                "MoE",
                f"expert_parallel is for E={ep.num_experts}, H={ep.hidden_size}, K={ep.top_k}; the layer has "
                f"E={preset.num_experts}, H={hidden_size}, K={preset.top_k}",
            )
        for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            check(
                size > 0 and size % QUANT_BLOCK == 0,
                "MoE",
                f"{name} must be a positive multiple of 128 (the grouped GEMMs' K and N), got {size}",
            )
        check(dtype == torch.bfloat16, "MoE", f"dtype must be bfloat16 (quantize_() gives FP8), got {dtype}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = preset.num_experts, preset.top_k
        self.router_preset = preset
        self.logits_fp32, self.weights_dtype = logits_fp32, weights_dtype
        self.balance = balance_loss or BalanceLoss()
        self.fp8_training = fp8_training
        self.fp8_wgrad = False
        kw = dict(dtype=dtype, device=device)
        self.gate = TopKGate(hidden_size, preset.num_experts, preset.uses_bias, **kw)
        self.expert_parallel = ep
        num_held = preset.num_experts if ep is None else ep.num_local_experts
        self.experts = Experts(num_held, hidden_size, intermediate_size, **kw)
        self.shared_experts = (
            SwiGLUMLP(hidden_size, shared_intermediate_size, **kw) if shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **kw) if shared_expert_gate else None
        # Exact integer counts of a training run's routed (token, expert) pairs, for update_bias.
        self.register_buffer(
            "routed_counts",
            torch.zeros(preset.num_experts, dtype=torch.int64, device=device),
            persistent=False,
        )
        self.balance_losses: dict[str, torch.Tensor] = {}
        self.aux_loss: torch.Tensor | None = None
        self._side_streams: dict[int, tuple] = {}  # device index -> (stream, fork event, join event)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters(init_std)

    # -- construction ------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Every weight ~ N(0, std); the expert bias and the counts to zero. bf16 experts only."""
        check(not self.is_fp8, "MoE.reset_parameters", "the experts are FP8; build a new MoE instead")
        for p in self.parameters():
            p.normal_(0.0, std)
        if self.gate.e_score_correction_bias is not None:
            self.gate.e_score_correction_bias.zero_()
        self.routed_counts.zero_()

    @classmethod
    def from_config(cls, preset: ModelPreset | str, **overrides) -> "MoE":
        """A layer of a released model's sizes: a ModelPreset or a name in ``moe_kernels.MODEL_PRESETS``
        ("deepseek_v3", "kimi_k2", "deepseek_v2", "deepseek_moe_16b", "qwen3_moe", "qwen2_moe",
        "mixtral", "olmoe"). Keyword overrides go to the constructor (e.g. device="cuda", a smaller
        router=RouterPreset(...), balance_loss=BalanceLoss(sequence=1e-4))."""
        model = MODEL_PRESETS[preset] if isinstance(preset, str) else preset
        kwargs = dict(
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            router=model.router_preset,
            shared_intermediate_size=model.shared_intermediate_size,
            shared_expert_gate=model.shared_expert_gate,
            logits_fp32=model.logits_fp32,
        )
        return cls(**(kwargs | overrides))

    @classmethod
    def from_transformers(cls, block: nn.Module) -> "MoE":
        """The layer of a transformers 5.x MoE block, sharing its tensors (no copy): DeepseekV3MoE
        (and Kimi-K2), DeepseekV2Moe, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock,
        MixtralSparseMoeBlock, OlmoeSparseMoeBlock; bf16 experts or transformers' FP8Experts
        (fine-grained FP8, 128x128 blocks). The shared experts module is reused as it is.
        Raises ValueError for other blocks (e.g. GPT-OSS) with the reason."""
        spec = describe_block(block)
        if getattr(block, "jitter_noise", 0.0):
            warnings.warn(
                f"MoE.from_transformers: {type(block).__name__}'s router jitter noise (training only) is not "
                "applied by the fused layer",
                stacklevel=2,
            )
        experts = block.experts
        with torch.device("meta"):
            moe = cls(
                spec.hidden_size,
                spec.intermediate_size,
                spec.router.preset,
                logits_fp32=spec.router.logits_fp32,
                weights_dtype=torch.bfloat16 if spec.router.weights_in_logits_dtype else None,
                device="meta",
            )
        device = experts.gate_up_proj.device
        moe.gate.weight = block.gate.weight
        if spec.router.preset.uses_bias:
            moe.gate.e_score_correction_bias = block.gate.e_score_correction_bias
        if experts.gate_up_proj.dtype == FP8:
            moe.experts.set_fp8(
                experts.gate_up_proj,
                fp32_scales(experts.gate_up_proj_scale_inv),
                experts.down_proj,
                fp32_scales(experts.down_proj_scale_inv),
            )
        else:
            moe.experts.gate_up_proj, moe.experts.down_proj = experts.gate_up_proj, experts.down_proj
        shared = spec.shared_experts
        gate_proj = getattr(shared, "gate_proj", None)
        if gate_proj is not None and gate_proj.weight.dtype == FP8:  # transformers' FP8Linear: our GEMMs
            shared = FP8SwiGLUMLP.from_mlp(shared)
        moe.shared_experts = shared
        moe.shared_expert_gate = spec.shared_expert_gate
        moe.routed_counts = torch.zeros(spec.router.preset.num_experts, dtype=torch.int64, device=device)
        left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
        check(not left, "MoE.from_transformers", f"tensors not taken from the block: {left}")
        return moe

    @torch.no_grad()
    def quantize_(self, *, shared_experts: bool = False, pow2_scale: bool = False) -> "MoE":
        """FP8 in place: the routed experts' bf16 weights become e4m3 with fp32 128x128 scales
        (bit-exact with ``quantize_fp8_weight``). With shared_experts=True the shared experts too
        (DeepSeek-V3's recipe: an FP8SwiGLUMLP replaces them; a module shared with transformers is
        not modified); measured on DeepSeek-V3 at T = 4096 this takes the layer's error against bf16
        from 4.2% to 6.4% for 4% less time. The gate (and Qwen2-MoE's shared-expert gate) stay."""
        if not self.is_fp8:
            gate_up = quantize_fp8_weight(self.experts.gate_up_proj.detach(), pow2_scale=pow2_scale)
            down = quantize_fp8_weight(self.experts.down_proj.detach(), pow2_scale=pow2_scale)
            self.experts.set_fp8(*gate_up, *down)
        if (
            shared_experts
            and self.shared_experts is not None
            and not isinstance(self.shared_experts, FP8SwiGLUMLP)
        ):
            self.shared_experts = FP8SwiGLUMLP.from_mlp(self.shared_experts, pow2_scale=pow2_scale)
        return self

    @property
    def is_fp8(self) -> bool:
        return self.experts.is_fp8

    @property
    def expert_bias(self) -> torch.Tensor | None:
        return self.gate.e_score_correction_bias

    def extra_repr(self) -> str:
        p = self.router_preset
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={p.num_experts}, "
            f"top_k={p.top_k}, score={p.score_func}, bias={p.uses_bias}, groups={p.num_groups}/"
            f"{p.topk_groups}, fp8={self.is_fp8}"
        )

    # -- auxiliary-loss-free balancing -------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3, group=None) -> torch.Tensor:
        """bias_i += rate * sign(mean(c) - c_i) with c the counts routed since the last update, summed
        over ``group`` (a torch.distributed process group: the data-parallel ranks) when given; then
        the counts restart from zero. Returns the bias."""
        bias = self.expert_bias
        check(bias is not None, "MoE.update_bias", "this layer's router has no expert bias (uses_bias=False)")
        check(
            bias.dtype == torch.float32,
            "MoE.update_bias",
            f"the expert bias must be float32, got {bias.dtype}",
        )
        if group is not None:
            all_reduce_counts(self.routed_counts, group)
        update_expert_bias_(bias, self.routed_counts, rate)
        self.routed_counts.zero_()
        return bias

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, seq_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H] bf16 -> [..., H] bf16. seq_offsets: int32 [S + 1] cumulative sequence starts on
        x's device for the sequence-wise balance loss (default: the leading dim of a 3-D x)."""
        check(
            x.shape[-1] == self.hidden_size,
            "MoE",
            f"x must be [..., {self.hidden_size}], got {list(x.shape)}",
        )
        check(x.dtype == torch.bfloat16, "MoE", f"x must be bfloat16, got {x.dtype}")
        weight = self.experts.gate_up_proj
        check(x.device == weight.device, "MoE", f"x is on {x.device}, the layer on {weight.device}")
        tokens = x.reshape(-1, self.hidden_size).contiguous()
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in self.experts.parameters() if p.is_floating_point())
        )
        shared = self._shared_begin(tokens)
        logits = gate_logits(tokens, self.gate.weight, self.logits_fp32)
        p = self.router_preset
        track = self.training
        bias = self.expert_bias
        weights, ids, counts = router(
            logits,
            p.top_k,
            bias=None if bias is None else bias.float(),  # a shared transformers bias may be bf16
            return_counts=track and self.expert_bias is not None,
            **p.router_kwargs(),
        )
        if track:
            self._record_training_stats(logits, ids, counts, x, seq_offsets)
        if self.weights_dtype is not None:
            weights = weights.to(self.weights_dtype)
        if self.expert_parallel is not None:
            if needs_grad and self._fp8_compute:
                raise NotImplementedError(
                    "MoE: with expert parallelism FP8 experts are inference only (dispatch's FP8 rows carry "
                    "no gradient); train the bf16 experts, or run under torch.no_grad()"
                )
            return self._expert_parallel(tokens, ids, weights, shared).view(x.shape)
        y, row_map = self._routed_experts(tokens, ids, needs_grad)
        out = unpermute(y, row_map, weights, shared_output=self._shared_end(shared, tokens))
        return out.view(x.shape)

    @property
    def _fp8_compute(self) -> bool:
        """The routed experts' GEMMs run in FP8 (FP8 weights, or the FP8 training recipe)."""
        return self.is_fp8 or self.fp8_training

    def _routed_experts(self, tokens, ids, needs_grad):
        """(y, row_map): the tokens' rows permuted (FP8 in the same pass for FP8 GEMMs), then the
        experts; bf16 through the differentiable ops, FP8 through the recipe's autograd function
        when a gradient is needed or the weights are the bf16 masters."""
        if self.fp8_training or (self.is_fp8 and needs_grad):
            return fp8_routed_expert_mlp(
                tokens, ids, self.num_experts, fp8_wgrad=self.fp8_wgrad, **self.experts.mlp_kwargs()
            )
        r = permute(tokens, ids, self.num_experts, quantize=self.is_fp8)
        return self._run_experts(r.out, r.out_scales, r.expert_offsets), r.row_map

    def _expert_parallel(self, tokens, ids, weights, shared):
        """Routed experts spread over the ranks: dispatch, this rank's experts, combine (with the
        shared experts' output, which ran on the side stream meanwhile)."""
        ep = self.expert_parallel
        sent = ep.dispatch(tokens, ids, weights, quantize=self._fp8_compute)
        y = self._run_experts(sent.out, sent.out_scales, sent.expert_offsets)
        return ep.combine(y, sent.handle, shared_output=self._shared_end(shared, tokens))

    def _run_experts(self, rows, row_scales, offsets):
        """This layer's experts on rows grouped by expert (FP8 rows for FP8 GEMMs)."""
        kwargs = self.experts.mlp_kwargs()
        if self.fp8_training and not self.is_fp8:  # the bf16 masters' cached FP8 copies
            gate_up, down = (fp8_weight(kwargs[name]) for name in ("w_gate_up", "w_down"))
            kwargs = dict(
                w_gate_up=gate_up.q,
                w_down=down.q,
                w_gate_up_scales=gate_up.scales,
                w_down_scales=down.scales,
            )
        return expert_mlp(rows, offsets, x_scales=row_scales, **kwargs)

    def _record_training_stats(self, logits, ids, counts, x, seq_offsets) -> None:
        if counts is not None:
            self.routed_counts += counts
        b, score = self.balance, self.router_preset.score_func
        losses = {}
        if b.expert:
            losses["expert"] = balance_loss(logits, ids, score_func=score, alpha=b.expert)
        if b.device:
            losses["device"] = balance_loss(
                logits, ids, score_func=score, alpha=b.device, num_devices=b.num_devices
            )
        if b.sequence:
            if seq_offsets is None and x.dim() == 3:
                seq_offsets = torch.arange(
                    0, x.shape[0] * x.shape[1] + 1, x.shape[1], dtype=torch.int32, device=x.device
                )
            losses["sequence"] = balance_loss(
                logits, ids, score_func=score, alpha=b.sequence, seq_offsets=seq_offsets
            )
        self.balance_losses = losses
        self.aux_loss = sum(losses.values()) if losses else None

    # -- shared experts on a side stream -----------------------------------------------------------

    def _shared(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.shared_experts(tokens)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(tokens)) * out
        return out

    def _shared_begin(self, tokens: torch.Tensor):
        """Start the shared experts: on CUDA on a side stream that first waits for the current one,
        so they overlap the router, permute and routed GEMMs."""
        if self.shared_experts is None:
            return None
        if not tokens.is_cuda:
            return self._shared(tokens)
        side, fork, _ = self._side_stream(tokens.device)
        fork.record(torch.cuda.current_stream(tokens.device))
        side.wait_event(fork)
        with torch.cuda.stream(side):
            return self._shared(tokens)

    def _shared_end(self, shared: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
        """Join the side stream. Its output's memory belongs to the side stream's pool; it is safe to
        reuse there once freed because the side stream's next work waits for the current stream."""
        if shared is None or not tokens.is_cuda:
            return shared
        side, _, join = self._side_stream(tokens.device)
        join.record(side)
        torch.cuda.current_stream(tokens.device).wait_event(join)
        return shared

    def _side_stream(self, device: torch.device):
        """(stream, fork event, join event) of a device, made once: reusing the events saves host
        time per call (an event's wait uses its latest record, also inside a graph capture)."""
        entry = self._side_streams.get(device.index)
        if entry is None:
            entry = self._side_streams[device.index] = (
                torch.cuda.Stream(device),
                torch.cuda.Event(),
                torch.cuda.Event(),
            )
        return entry


def gate_logits(tokens: torch.Tensor, weight: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Router logits tokens @ weight^T [T, E]: in fp32 (DeepSeek) or in the tokens' dtype."""
    if not fp32:
        return F.linear(tokens, weight.to(tokens.dtype))
    needs_grad = torch.is_grad_enabled() and (tokens.requires_grad or weight.requires_grad)
    if tokens.is_cuda and not needs_grad and weight.dtype == tokens.dtype == torch.bfloat16:
        # bf16 products are exact in fp32: one bf16 GEMM with fp32 accumulation and output gives the
        # fp32 logits without writing an fp32 copy of the tokens (only the order of the sum differs).
        return torch.mm(tokens, weight.t(), out_dtype=torch.float32)
    return F.linear(tokens.float(), weight.float())
