"""Every CUDA op once on small inputs with edges, for compute-sanitizer (scripts/gpu_check.sh runs it
under memcheck, racecheck, synccheck and initcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each
tensor is its own allocation and an out-of-bounds access cannot land in a neighbour's memory).

Edges: T = 0, 1, 37, 300; dropped ids (-1); align 128; FP8; empty experts; every GEMM configuration.
Results are checked elsewhere (tests/); this only has to touch every kernel path. Prints one line per
family so the sanitizer's report can be read against it.
"""

import torch

import moe_kernels
from moe_kernels import MoE, RouterPreset
from moe_kernels.ops.grouped_gemm import grouped_gemm_dgrad, grouped_gemm_wgrad, silu_mul_backward
from moe_kernels.ops.quant import quantize_fp8_transposed, quantize_fp8_weight_transposed

DEV, BF16 = "cuda", torch.bfloat16
TOKENS = (0, 1, 37, 300)
H, E, K = 256, 8, 2


def routing(t, e=E, k=K, drop=True):
    ids = torch.rand(t, e, device=DEV).topk(k, dim=1).indices.to(torch.int32)
    if drop and t > 1:
        ids[::3, -1] = -1  # dropped pairs
    return ids


def quant():
    for t in TOKENS:
        x = torch.randn(t, H, device=DEV, dtype=BF16)
        q, s = moe_kernels.quantize_fp8(x)
        moe_kernels.dequantize_fp8(q, s)
    w = torch.randn(3, 256, H, device=DEV, dtype=BF16)
    q, s = moe_kernels.quantize_fp8_weight(w)
    moe_kernels.dequantize_fp8(q, s)
    quantize_fp8_weight_transposed(w)
    for counts in ([0, 37, 300], [128, 0, 1]):
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        x = torch.randn(sum(counts), H, device=DEV, dtype=BF16)
        quantize_fp8_transposed(x, offsets)


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
        for t in TOKENS:
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
                if bias is not None:
                    moe_kernels.update_expert_bias_(bias, out.counts, 1e-3)


def permute():
    for t in TOKENS:
        x = torch.randn(t, H, device=DEV, dtype=BF16, requires_grad=True)
        ids = routing(t)
        for align, quantize in ((1, False), (128, False), (1, True), (128, True)):
            p = moe_kernels.permute(x.detach(), ids, E, align=align, quantize=quantize)
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
        (p.out.float().sum()).backward()


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
                moe_kernels.grouped_gemm(a, b, offsets, config=config)
            if config == "auto" or config.startswith("fp8"):
                moe_kernels.grouped_gemm(qa, qb, offsets, a_scales=sa, b_scales=sb, config=config)
        grad = torch.randn(m, 256, device=DEV, dtype=BF16)
        grouped_gemm_dgrad(grad, b, offsets)
        for out_dtype in (BF16, torch.float32):
            grouped_gemm_wgrad(grad, a, offsets, out_dtype=out_dtype)
            grouped_gemm_wgrad(grad, a, offsets, fp8=True, out_dtype=out_dtype)
        grouped_gemm_wgrad(grad, a, offsets, config="pingpong")
        grouped_gemm_wgrad(grad, a, offsets, fp8=True, config="pingpong")
        h = torch.randn(m, 512, device=DEV, dtype=BF16)
        for quantize in (False, True):
            moe_kernels.silu_mul(h, offsets, quantize=quantize)
            silu_mul_backward(
                torch.randn(m, 256, device=DEV, dtype=BF16), h, offsets, return_act=True, quantize=quantize
            )


def layer():
    preset = RouterPreset(
        num_experts=E, top_k=K, score_func="sigmoid", uses_bias=True, num_groups=2, topk_groups=1
    )
    for fp8_training in (False, True):
        moe = MoE(H, 256, preset, shared_intermediate_size=256, device=DEV, fp8_training=fp8_training)
        for t in TOKENS:
            x = torch.randn(t, H, device=DEV, dtype=BF16, requires_grad=True)
            moe(x).float().sum().backward()
    moe = MoE(H, 256, preset, shared_intermediate_size=256, device=DEV).eval().quantize_()
    with torch.no_grad():
        for t in TOKENS:
            moe(torch.randn(t, H, device=DEV, dtype=BF16))


if __name__ == "__main__":
    failed = []
    for family in (quant, router, permute, gemm, layer):
        try:  # one family's Python error must not hide the others from the sanitizer
            family()
            torch.cuda.synchronize()
            print(f"sanitize_ops: {family.__name__} done", flush=True)
        except Exception as error:  # noqa: BLE001
            failed.append(family.__name__)
            print(f"sanitize_ops: {family.__name__} FAILED: {error!r}", flush=True)
    raise SystemExit(f"sanitize_ops: failed families {failed}" if failed else 0)
