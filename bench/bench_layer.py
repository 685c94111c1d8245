"""MoE layer benchmark: moe_kernels.MoE against transformers' own block on the same weights.

Layers: DeepSeek-V3 (H 7168, I 2048, 256 routed + 1 shared, K 8, sigmoid + bias + groups) and
Qwen3-30B-A3B (H 2048, I 768, 128 experts, K 8), at T = 128, 4096 and 16384 tokens. Weights ~
N(0, 0.02) with a non-zero expert bias and random tokens: every row's load is what the layer's own
router draws, uneven as in use ("max/mean load": the fullest expert's rows over the mean). There is
no balanced row: the layer routes its tokens itself.

Baselines, in the same process: the transformers 5.x block with its fastest experts implementation
(`grouped_mm`) and with `eager`. transformers' third, `batched_mm`, gathers one copy of the expert
weights per (token, expert) pair (60 GB for DeepSeek-V3 at T = 128), so it is slower than
`grouped_mm` at every T here; generate() picks it only for decode steps of a few tokens. Ours:
MoE.from_transformers(block) in bf16 (sharing the block's tensors) and after quantize_() (FP8 routed
experts, 1x128 / 128x128 scales). Also timed at T = 4096: the same ops chained by hand in one stream
(the module's overhead over the raw ops).
Decode (T = 128) also reports the bandwidth over the weight bytes read (experts hit + shared + gate)
as a % of the copy bandwidth measured in the same run. "graph ms" is ours replayed from a CUDA graph
(the GPU time without launch gaps, as a serving engine runs it). "ours FP8" is quantize_(): routed
experts in FP8, shared experts bf16; "ours FP8 + shared" (DeepSeek-V3) quantises the shared experts
too. Writes layer.json and layer.png (speed-ups).
"""

import argparse
import time
from pathlib import Path

import torch

import moe_kernels
from moe_kernels import MoE
from moe_kernels.layers.moe import gate_logits
from moe_kernels.testing import measure_copy_tbps, rel_error, report, time_cuda_graph_us, time_cuda_us
from moe_kernels.testing.transformers_models import real_block

FAMILIES = ("deepseek_v3", "qwen3_moe")
TOKENS = (128, 4096, 16384)


def log(message: str) -> None:
    print(f"[layer {time.strftime('%H:%M:%S')}] {message}", flush=True)


def transformers_forward(block, impl):
    """The block with transformers' experts implementation `impl` ("grouped_mm" or "eager")."""

    def run(x):
        block.experts.config._experts_implementation = impl
        return block(x[None])[0]

    return run


def raw_chain(moe: MoE):
    """The module's ops chained by hand on one stream (no side stream, no checks)."""
    p, e = moe.router_preset, moe.experts

    def run(x):
        logits = gate_logits(x, moe.gate.weight, moe.logits_fp32)
        bias = moe.expert_bias
        weights, ids, _ = moe_kernels.router(
            logits, p.top_k, bias=None if bias is None else bias.float(), **p.router_kwargs()
        )
        if moe.weights_dtype is not None:
            weights = weights.to(moe.weights_dtype)
        r = moe_kernels.permute(x, ids, p.num_experts, quantize=moe.is_fp8)
        y = moe_kernels.expert_mlp(r.out, r.expert_offsets, x_scales=r.out_scales, **e.mlp_kwargs())
        shared = moe.shared_experts(x) if moe.shared_experts is not None else None
        return moe_kernels.unpermute(y, r.row_map, weights, shared_output=shared)

    return run


@torch.no_grad()
def expert_counts(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Rows each expert receives from the layer's own router on x (the load the GEMMs see)."""
    logits = gate_logits(x, moe.gate.weight, moe.logits_fp32)
    bias = moe.expert_bias
    p = moe.router_preset
    _, _, counts = moe_kernels.router(
        logits, p.top_k, bias=None if bias is None else bias.float(), return_counts=True, **p.router_kwargs()
    )
    return counts


def weight_bytes_read(moe: MoE, hit: int) -> int:
    """Bytes of weights a forward with `hit` experts receiving tokens must read: those experts, the
    shared experts and the gate (the floor of decode, where the weights dominate the traffic)."""
    e = moe.experts
    per_expert = (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * e.gate_up_proj.element_size()
    if e.is_fp8:
        per_expert += (e.gate_up_proj_scale_inv[0].numel() + e.down_proj_scale_inv[0].numel()) * 4
    shared = (
        sum(t.numel() * t.element_size() for t in moe.shared_experts.parameters())
        if moe.shared_experts
        else 0
    )
    gate = moe.gate.weight.numel() * moe.gate.weight.element_size()
    return hit * per_expert + shared + gate


def bench_family(family, copy_tbps, rows):
    log(f"{family}: building transformers' block at real dims")
    block = real_block(family)
    ours_bf16 = MoE.from_transformers(block)
    ours_fp8 = MoE.from_transformers(block).quantize_()
    ours = {"ours bf16": ours_bf16, "ours FP8": ours_fp8}
    if ours_bf16.shared_experts is not None:
        ours["ours FP8 + shared"] = MoE.from_transformers(block).quantize_(shared_experts=True)
    hidden = block.experts.gate_up_proj.shape[2]
    gen = torch.Generator(device="cuda").manual_seed(0)
    impls = {
        "transformers grouped_mm": transformers_forward(block, "grouped_mm"),
        "transformers eager": transformers_forward(block, "eager"),
        **ours,
    }
    for tokens in TOKENS:
        x = torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()
        with torch.no_grad():
            reference_out = impls["transformers grouped_mm"](x).float()
            times = {}
            for name, fn in impls.items():
                slow = name == "transformers eager"
                times[name] = time_cuda_us(
                    lambda fn=fn, x=x: fn(x), warmup=1 if slow else 3, reps=5 if slow else 20
                )
                log(f"{family} T={tokens}: {name} {times[name] / 1e3:.3f} ms")
            if tokens == 4096:
                for name, moe in (("raw ops bf16", ours_bf16), ("raw ops FP8", ours_fp8)):
                    chain = raw_chain(moe)
                    times[name] = time_cuda_us(lambda chain=chain, x=x: chain(x), warmup=3, reps=20)
                    log(f"{family} T={tokens}: {name} {times[name] / 1e3:.3f} ms")
            for name in ours:  # the GPU time alone: no launch gaps
                fn = impls[name]
                calls = 10 if tokens <= 4096 else 2
                times[f"{name} graph"] = time_cuda_graph_us(
                    lambda fn=fn, x=x: fn(x), calls_per_graph=calls, reps=5
                )
                log(f"{family} T={tokens}: {name} in a CUDA graph {times[f'{name} graph'] / 1e3:.3f} ms")
            errors = {name: rel_error(impls[name](x).float(), reference_out) for name in ours}
        base, eager = times["transformers grouped_mm"], times["transformers eager"]
        counts = expert_counts(ours_bf16, x).float()
        hit = int((counts > 0).sum())
        for name, moe in ours.items():
            us = times[name]
            row = {
                "layer": family,
                "T": tokens,
                "impl": name,
                "ms": us / 1e3,
                "graph ms": times[f"{name} graph"] / 1e3,
                "transformers grouped_mm ms": base / 1e3,
                "transformers eager ms": eager / 1e3,
                "x grouped_mm": base / us,
                "x eager": eager / us,
                "rel err vs grouped_mm": errors[name],
                "max/mean load": float(counts.max() / counts.mean()),
            }
            raw = times.get({"ours bf16": "raw ops bf16", "ours FP8": "raw ops FP8"}.get(name))
            if raw is not None:
                row["raw ops ms"] = raw / 1e3
                row["module overhead %"] = 100 * (us / raw - 1)
            if tokens <= 128:
                nbytes = weight_bytes_read(moe, hit)
                row["experts hit"] = hit
                row["weights GB/s"] = nbytes / (us * 1e-6) / 1e9
                row["% of copy"] = 100 * nbytes / (us * 1e-6) / (copy_tbps * 1e12)
                row["% of copy (graph)"] = 100 * nbytes / (times[f"{name} graph"] * 1e-6) / (copy_tbps * 1e12)
            rows.append(row)
    del impls, ours, ours_bf16, ours_fp8, block
    torch.cuda.empty_cache()


def chart(rows, path: Path) -> None:
    """Bar chart of the speed-ups over transformers' grouped_mm, one group per (layer, T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["layer"], r["T"]) for r in rows}, key=lambda c: (FAMILIES.index(c[0]), c[1]))
    labels = [f"{layer}\nT={t}" for layer, t in cases]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for i, impl in enumerate(("ours bf16", "ours FP8")):
        values = [
            next(r["x grouped_mm"] for r in rows if (r["layer"], r["T"], r["impl"]) == (*c, impl))
            for c in cases
        ]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(cases))], values, width, label=impl)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="gray", lw=1, ls="--", label="transformers grouped_mm")
    ax.set_xticks(range(len(cases)), labels)
    ax.set_ylabel("speed-up over transformers 5.x (grouped_mm)")
    device = torch.cuda.get_device_name()
    ax.set_title(f"MoE layer forward, moe_kernels vs transformers, {device}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out_dir="bench/results", copy_tbps=None):
    copy_tbps = copy_tbps or measure_copy_tbps()
    rows = []
    for family in FAMILIES:
        bench_family(family, copy_tbps, rows)
    columns = [
        "layer",
        "T",
        "impl",
        "ms",
        "graph ms",
        "transformers grouped_mm ms",
        "x grouped_mm",
        "x eager",
        "rel err vs grouped_mm",
        "max/mean load",
        "module overhead %",
        "experts hit",
        "weights GB/s",
        "% of copy",
        "% of copy (graph)",
    ]
    title = f"MoE layer forward vs transformers (copy {copy_tbps:.2f} TB/s, same run)"
    report(
        title, "layer", rows, columns, out_dir, ["x grouped_mm", "x eager"], extra={"copy TB/s": copy_tbps}
    )
    chart(rows, Path(out_dir) / "layer.png")
    log(f"wrote {Path(out_dir) / 'layer.json'} and layer.png")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for layer.json and layer.png")
    main(parser.parse_args().out)
