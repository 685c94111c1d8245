"""Router benchmark: the fused kernels vs the router a user would write in eager PyTorch (the
transformers DeepSeek-V3 / Qwen3 routing code, with -inf group masking) and torch.compile of it.

GB/s count the bytes that must move: forward reads the logits and writes fp32 weights and int32 ids;
backward reads grad_weights and ids (and the logits for softmax, the K picked logits for sigmoid)
and writes grad_logits. % of copy is against the copy bandwidth measured in the same process.
"us" is one call on an idle GPU after an L2 flush (CUDA events); "graph us" the same call replayed
from a CUDA graph (no launch gaps: the decode setting of the <= 10 µs target, and the GPU time of
the large cases). The backward is also split into what autograd adds: its GPU work per call (every
kernel launched, from the profiler) against the kernel alone, and its host time per call.
"""

import argparse

import torch
import torch._functorch.config

import moe_kernels
from moe_kernels import PRESETS
from moe_kernels.testing import (
    gpu_time_us,
    host_time_us,
    measure_copy_tbps,
    report,
    time_cuda_graph_us,
    time_cuda_us,
)

# (preset, logits dtype, tokens): DeepSeek-V3 and Kimi-K2 compute router logits in fp32, Qwen3 in bf16.
CASES = [
    ("deepseek_v3", torch.float32, 1),
    ("deepseek_v3", torch.float32, 128),
    ("deepseek_v3", torch.float32, 4096),
    ("deepseek_v3", torch.float32, 65536),
    ("qwen3_moe", torch.bfloat16, 128),
    ("qwen3_moe", torch.bfloat16, 4096),
    ("qwen3_moe", torch.bfloat16, 65536),
    ("kimi_k2", torch.float32, 128),
    ("kimi_k2", torch.float32, 4096),
    ("kimi_k2", torch.float32, 65536),
]


def eager_router(
    logits, bias, top_k, score_func, num_groups, topk_groups, group_score, renormalize, scaling_factor
):
    """What transformers' routers do (DeepseekV3TopkRouter / Qwen3MoeSparseMoeBlock), in eager PyTorch."""
    scores = logits.float().sigmoid() if score_func == "sigmoid" else logits.float().softmax(-1)
    sel = scores if bias is None else scores + bias
    t, e = sel.shape
    if num_groups > 1:
        grouped = sel.view(t, num_groups, -1)
        group = grouped.topk(2, -1)[0].sum(-1) if group_score == "top2_sum" else grouped.amax(-1)
        keep = torch.zeros_like(group).scatter_(1, group.topk(topk_groups, -1, sorted=False)[1], 1.0)
        sel = sel.masked_fill(~keep.bool().repeat_interleave(e // num_groups, 1), float("-inf"))
    ids = sel.topk(top_k, -1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    counts = torch.zeros(e, dtype=torch.int32, device=logits.device).scatter_add_(
        0, ids.flatten(), torch.ones_like(ids.flatten(), dtype=torch.int32)
    )
    return weights * scaling_factor, ids, counts


# The backward baselines call autograd.grad with retain_graph=True to time the backward alone,
# which torch.compile's donated buffers forbid.
torch._functorch.config.donated_buffer = False
_compiled_router = torch.compile(eager_router)


def forward_case(name, dtype, t, copy_tbps):
    preset = PRESETS[name]
    e, k = preset.num_experts, preset.top_k
    logits = torch.randn(t, e, device="cuda").to(dtype)
    bias = torch.randn(e, device="cuda") * 0.1 if preset.uses_bias else None
    kwargs = preset.router_kwargs()
    args = (logits, bias, k, *kwargs.values())
    ours = lambda: moe_kernels.router(logits, k, bias=bias, return_counts=True, **kwargs)
    nbytes = logits.numel() * logits.element_size() + t * k * 8
    us = time_cuda_us(ours)
    row = {"op": "router fwd", "preset": name, "dtype": str(dtype).removeprefix("torch."), "T": t, "us": us}
    row["graph us"] = time_cuda_graph_us(ours)
    row["GB/s"] = nbytes / (us * 1e-6) / 1e9
    row["% of copy"] = 100 * row["GB/s"] / (copy_tbps * 1e3)
    row["eager us"] = time_cuda_us(lambda: eager_router(*args))
    row["x eager"] = row["eager us"] / us
    row["compiled us"] = time_cuda_us(lambda: _compiled_router(*args))
    row["x compiled"] = row["compiled us"] / us
    return row


def backward_case(name, dtype, t, copy_tbps):
    preset = PRESETS[name]
    e, k = preset.num_experts, preset.top_k
    logits = torch.randn(t, e, device="cuda").to(dtype).requires_grad_(True)
    bias = torch.randn(e, device="cuda") * 0.1 if preset.uses_bias else None
    kwargs = preset.router_kwargs()
    grad = torch.randn(t, k, device="cuda")

    def backward(weights):
        # Through autograd, as a training step runs it: at small T this is mostly host time.
        return lambda: torch.autograd.grad(weights, logits, grad, retain_graph=True)

    out = moe_kernels.router(logits, k, bias=bias, **kwargs)
    us = time_cuda_us(backward(out.weights))
    # The kernel alone, replayed from a CUDA graph (no autograd host time).
    config = (preset.score_func, preset.renormalize, preset.scaling_factor)
    kernel = lambda: torch.ops.moe_kernels.router_backward(grad, logits.detach(), out.ids, *config)
    elt = logits.element_size()
    read_logits = t * e * elt if preset.score_func == "softmax" else t * k * elt
    nbytes = t * k * 8 + read_logits + t * e * elt
    row = {"op": "router bwd", "preset": name, "dtype": str(dtype).removeprefix("torch."), "T": t, "us": us}
    row["graph us"] = time_cuda_graph_us(kernel)
    # What the autograd path adds: GPU work (every kernel it launches, from the profiler) and host
    # time per call. "us" is an idle GPU waiting for that host time; in a training step the host
    # runs ahead and only the GPU work counts.
    row["autograd gpu us"], row["autograd kernels"] = gpu_time_us(backward(out.weights))
    row["x kernel"] = row["autograd gpu us"] / row["graph us"]
    row["autograd host us"] = host_time_us(backward(out.weights))
    row["GB/s"] = nbytes / (us * 1e-6) / 1e9
    row["% of copy"] = 100 * row["GB/s"] / (copy_tbps * 1e3)
    row["eager us"] = time_cuda_us(backward(eager_router(logits, bias, k, *kwargs.values())[0]))
    row["x eager"] = row["eager us"] / us
    row["compiled us"] = time_cuda_us(backward(_compiled_router(logits, bias, k, *kwargs.values())[0]))
    row["x compiled"] = row["compiled us"] / us
    return row


def main(out_dir="bench/results", copy_tbps=None):
    copy_tbps = copy_tbps or measure_copy_tbps()
    rows = [forward_case(*case, copy_tbps) for case in CASES]
    rows += [backward_case(*case, copy_tbps) for case in CASES if case[2] >= 4096]
    columns = [
        "op",
        "preset",
        "dtype",
        "T",
        "us",
        "graph us",
        "autograd gpu us",
        "autograd kernels",
        "x kernel",
        "autograd host us",
        "GB/s",
        "% of copy",
        "eager us",
        "x eager",
        "compiled us",
        "x compiled",
    ]
    title = f"Router (copy ceiling {copy_tbps:.2f} TB/s measured)"
    report(title, "router", rows, columns, out_dir, ["x eager", "x compiled"], {"copy_tbps": copy_tbps})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for router.json")
    main(parser.parse_args().out)
