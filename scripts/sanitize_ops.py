"""Every CUDA op once on small inputs with edges, for compute-sanitizer (scripts/gpu_check.sh runs it
under memcheck, racecheck, synccheck and initcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each
tensor is its own allocation and an out-of-bounds access cannot land in a neighbour's memory).

Edges: T = 0, 1, 37, 300; dropped ids (-1); align 128; FP8; empty experts; every GEMM configuration.
Results are checked elsewhere (tests/); this only has to touch every kernel path, and then read every
output the op documents as written (`read`), so that initcheck sees an output left unwritten. Prints
a marker line after each read and each family ("sanitize_ops: ..."); scripts/sanitize_report.py
attributes each report to the marker that follows it.
"""

import dataclasses
import os

import torch

import moe_kernels
from moe_kernels import MoE, RouterPreset
from moe_kernels.distributed import loopback
from moe_kernels.distributed.expert_map import ExpertMap
from moe_kernels.layers import moe as moe_module
from moe_kernels.ops.grouped_gemm import grouped_gemm_dgrad, grouped_gemm_wgrad, silu_mul_backward
from moe_kernels.ops.quant import quantize_fp8_transposed, quantize_fp8_weight_transposed

DEV, BF16 = "cuda", torch.bfloat16
TOKENS = (0, 1, 37, 300)
H, E, K = 256, 8, 2


def read(label, *outputs):
    """Reads every element of the outputs (tensors, or tuples / dataclasses of them) on the GPU, then
    prints a marker: an initcheck report before it means an output was left unwritten."""
    pending = list(outputs)
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            if item.numel() > 0:
                item.detach().float().sum()
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif dataclasses.is_dataclass(item):
            pending.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    torch.cuda.synchronize()
    print(f"sanitize_ops: read {label}", flush=True)


def routing(t, e=E, k=K, drop=True):
    ids = torch.rand(t, e, device=DEV).topk(k, dim=1).indices.to(torch.int32)
    if drop and t > 1:
        ids[::3, -1] = -1  # dropped pairs
    return ids


def quant():
    for t in TOKENS:
        x = torch.randn(t, H, device=DEV, dtype=BF16)
        q, s = moe_kernels.quantize_fp8(x)
        read(f"quantize_fp8 T={t}", q, s, moe_kernels.dequantize_fp8(q, s))
    w = torch.randn(3, 256, H, device=DEV, dtype=BF16)
    q, s = moe_kernels.quantize_fp8_weight(w)
    read("quantize_fp8_weight", q, s, moe_kernels.dequantize_fp8(q, s))
    read("quantize_fp8_weight_transposed", quantize_fp8_weight_transposed(w))
    for counts in ([0, 37, 300], [128, 0, 1]):
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        x = torch.randn(sum(counts), H, device=DEV, dtype=BF16)
        qt, st, padded = quantize_fp8_transposed(x, offsets)
        used = H * int(padded[-1])  # the tail past the last expert's padded block is unspecified
        read(f"quantize_fp8_transposed {counts}", qt[:used], st[: used // 128], padded)


def router():
    presets = [
        moe_kernels.PRESETS["deepseek_v3"],
        moe_kernels.PRESETS["qwen3_moe"],
        moe_kernels.PRESETS["kimi_k2"],
        RouterPreset(
            num_experts=20, top_k=3, score_func="softmax", uses_bias=False, num_groups=4, topk_groups=2
        ),
    ]
    for preset in presets:
        # 1027 tokens: DeepSeek-V3's four-tokens-per-warp kernel runs from 1024 tokens (a last warp
        # with three tokens), the pair kernel below.
        for t in (*TOKENS, 1027):
            for dtype in (torch.float32, BF16):
                logits = torch.randn(t, preset.num_experts, device=DEV, dtype=dtype)
                if t > 2:
                    logits[1] = float("nan")
                    logits[2, :3] = float("inf")
                logits.requires_grad_(True)
                bias = torch.randn(preset.num_experts, device=DEV) * 0.1 if preset.uses_bias else None
                out = moe_kernels.router(
                    logits, preset.top_k, bias=bias, return_counts=True, **preset.router_kwargs()
                )
                out.weights.sum().backward()
                loss = moe_kernels.balance_loss(logits, out.ids, score_func=preset.score_func)
                loss.backward()
                read(f"router E={preset.num_experts} T={t} {dtype}", out, loss, logits.grad)
                if bias is not None:
                    moe_kernels.update_expert_bias_(bias, out.counts, 1e-3)


def permute():
    for t in TOKENS:
        x = torch.randn(t, H, device=DEV, dtype=BF16, requires_grad=True)
        ids = routing(t)
        for align, quantize in ((1, False), (128, False), (1, True), (128, True)):
            p = moe_kernels.permute(x.detach(), ids, E, align=align, quantize=quantize)
            read_permuted(f"permute T={t} align={align} quantize={quantize}", *p)
        moe_kernels.permute(x.detach(), ids, E, num_out_rows=max(t * K // 2, 1))  # too few rows
        try:  # reported through the device-error flag (the next front door would raise it)
            moe_kernels.check_device_errors()
        except RuntimeError:
            pass
        p = moe_kernels.permute(x, ids, E)
        w = torch.rand(t, K, device=DEV, requires_grad=True)
        shared = torch.randn(t, H, device=DEV, dtype=BF16)
        y = p.out.detach().requires_grad_(True)
        out = moe_kernels.unpermute(y, p.row_map, w, shared_output=shared)
        out.float().sum().backward()
        rows = int(p.expert_offsets[-1])  # rows past the last expert are documented as unwritten
        p.out[:rows].float().sum().backward()
        read(f"unpermute T={t}", out, y.grad[:rows], w.grad, x.grad)


def read_permuted(label, out, scales, expert_offsets, *others):
    """Rows grouped by expert (permute, dispatch): rows at or past expert_offsets[-1] are documented
    as left unwritten."""
    rows = int(expert_offsets[-1])
    read(label, out[:rows], None if scales is None else scales[:rows], expert_offsets, *others)


def gemm():
    for counts in ([0, 37, 300, 0], [1, 0, 0, 128], [0, 0, 0, 0]):
        e, m = len(counts), sum(counts)
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        a = torch.randn(m, H, device=DEV, dtype=BF16)
        b = torch.randn(e, 256, H, device=DEV, dtype=BF16) * 0.05
        qa, sa = moe_kernels.quantize_fp8(a)
        qb, sb = moe_kernels.quantize_fp8_weight(b)
        for config in moe_kernels.GEMM_CONFIGS:
            if config == "auto" or config.startswith("bf16"):
                read(
                    f"grouped_gemm {counts} {config} bf16",
                    moe_kernels.grouped_gemm(a, b, offsets, config=config),
                )
            if config == "auto" or config.startswith("fp8"):
                out = moe_kernels.grouped_gemm(qa, qb, offsets, a_scales=sa, b_scales=sb, config=config)
                read(f"grouped_gemm {counts} {config} fp8", out)
        grad = torch.randn(m, 256, device=DEV, dtype=BF16)
        read(f"grouped_gemm_dgrad {counts}", grouped_gemm_dgrad(grad, b, offsets))
        for out_dtype in (BF16, torch.float32):
            read(
                f"grouped_gemm_wgrad {counts} {out_dtype}",
                grouped_gemm_wgrad(grad, a, offsets, out_dtype=out_dtype),
            )
            out = grouped_gemm_wgrad(grad, a, offsets, fp8=True, out_dtype=out_dtype)
            read(f"grouped_gemm_wgrad fp8 {counts} {out_dtype}", out)
        read(f"grouped_gemm_wgrad pingpong {counts}", grouped_gemm_wgrad(grad, a, offsets, config="pingpong"))
        out = grouped_gemm_wgrad(grad, a, offsets, fp8=True, config="pingpong")
        read(f"grouped_gemm_wgrad fp8 pingpong {counts}", out)
        h = torch.randn(m, 512, device=DEV, dtype=BF16)
        for quantize in (False, True):
            act = moe_kernels.silu_mul(h, offsets, quantize=quantize)
            back = silu_mul_backward(
                torch.randn(m, 256, device=DEV, dtype=BF16), h, offsets, return_act=True, quantize=quantize
            )
            read(f"silu_mul {counts} quantize={quantize}", act, back)


# initcheck does not see TMA stores, so every read of a cuBLAS or CUTLASS GEMM output looks
# uninitialised to it (scripts/initcheck_probe.py: torch's silu on a cuBLAS output, no moe_kernels
# code). Under initcheck (MOE_KERNELS_INITCHECK=1) our grouped GEMMs allocate their outputs
# zero-filled (grouped_gemm.cu), the router's gate GEMM writes into zero-filled outputs here, and
# the shared experts (plain torch modules on cuBLAS) are left out; the other tools run them.
INITCHECK = os.environ.get("MOE_KERNELS_INITCHECK") == "1"


class _ZeroFilledLinear(torch.autograd.Function):
    """x @ w^T, and its gradients, written by cuBLAS into zero-filled outputs (see INITCHECK)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.matmul(x, w.t(), out=x.new_zeros(x.shape[0], w.shape[0]))

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = torch.matmul(grad, w, out=grad.new_zeros(grad.shape[0], w.shape[1]))
        return grad_x, torch.matmul(grad.t(), x, out=grad.new_zeros(w.shape))


def _zero_filled_gate_logits(tokens, weight, fp32):
    dtype = torch.float32 if fp32 else tokens.dtype
    return _ZeroFilledLinear.apply(tokens.to(dtype), weight.to(dtype))


def layer():
    preset = RouterPreset(
        num_experts=E, top_k=K, score_func="sigmoid", uses_bias=True, num_groups=2, topk_groups=1
    )
    shared = 0 if INITCHECK else 256
    if INITCHECK:
        moe_module.gate_logits = _zero_filled_gate_logits
    for fp8_training in (False, True):
        moe = MoE(H, 256, preset, shared_intermediate_size=shared, device=DEV, fp8_training=fp8_training)
        for t in TOKENS:
            x = torch.randn(t, H, device=DEV, dtype=BF16, requires_grad=True)
            out = moe(x)
            out.float().sum().backward()
            read(f"layer T={t} fp8_training={fp8_training}", out, x.grad)
    moe = MoE(H, 256, preset, shared_intermediate_size=shared, device=DEV).eval().quantize_()
    with torch.no_grad():
        for t in TOKENS:
            read(f"layer FP8 inference T={t}", moe(torch.randn(t, H, device=DEV, dtype=BF16)))


def ep():
    """Expert parallel on one GPU: every virtual rank's dispatch and combine through the loopback
    exchange (moe_kernels.distributed.loopback), which runs the same kernels as ExpertParallel."""
    ranks, experts, top_k = 4, 16, 4
    tokens = [37, 0, 300, 1]
    expert_map = ExpertMap.build(experts, ranks, None, DEV)
    modes = (  # quantize, align, capacity (0: exact sizes), device path
        (False, 1, 0, False),
        (True, 16, 0, False),
        (False, 128, max(tokens), False),
        (True, 1, max(tokens) + 3, True),
    )
    for quantize, align, capacity, device_path in modes:
        label = f"quantize={quantize} align={align} capacity={capacity} device_path={device_path}"
        xs = [torch.randn(t, H, device=DEV, dtype=BF16) for t in tokens]
        ids = [routing(t, experts, top_k) for t in tokens]
        weights = [torch.rand(t, top_k, device=DEV) for t in tokens]
        results = loopback.dispatch(
            xs,
            ids,
            weights,
            expert_map,
            quantize=quantize,
            align=align,
            capacity=capacity,
            device_path=device_path,
        )
        for rank, (out, scales, offsets, _) in enumerate(results):
            read_permuted(f"ep dispatch rank {rank} {label}", out, scales, offsets)
        # Stand-in experts: any values will do; combine reads only the rows the pairs name.
        ys = [torch.randn(out.shape[0], H, device=DEV, dtype=BF16) for out, *_ in results]
        read(f"ep combine {label}", loopback.combine(ys, [handle for *_, handle in results]))


if __name__ == "__main__":
    failed = []
    for family in (quant, router, permute, gemm, layer, ep):
        try:  # one family's Python error must not hide the others from the sanitizer
            family()
            torch.cuda.synchronize()
            print(f"sanitize_ops: {family.__name__} done", flush=True)
        except Exception as error:  # noqa: BLE001
            failed.append(family.__name__)
            print(f"sanitize_ops: {family.__name__} FAILED: {error!r}", flush=True)
    raise SystemExit(f"sanitize_ops: failed families {failed}" if failed else 0)
