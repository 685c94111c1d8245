"""Grouped GEMM benchmark: our kernels (CUTLASS configurations and our own wgmma kernels) vs what a
user would otherwise call.

FP8 (ours: 1x128 / 128x128 blockwise scales, fp32 promotion every 128 of K) against
torch._scaled_grouped_mm (FP8 rowwise, coarser scales) with fast accumulation (the fastest setting,
the baseline of the targets) and with its default, and a loop of torch._scaled_mm; BF16 against
torch._grouped_mm. The ceiling is one dense cuBLAS GEMM with the same FLOPs (FP8 rowwise with fast
accumulation for FP8, bf16 for BF16), measured in the same run. TFLOP/s count useful rows only.

Loads: "realistic" counts are what a router gives (T*K picks drawn from uniform experts, so the
fullest of 32 experts gets ~5% more rows than the mean), "skewed" a Zipf router, "balanced" equal
counts. Decode rows also report GB/s of expert weights read (all their bytes must stream from HBM)
and that rate as % of the copy bandwidth measured in the same process. Our configurations and the
grouped torch baselines of a row are timed in interleaved rounds (time_cuda_us_interleaved), so
that no candidate gains from its position in the run.
"""

import argparse
import itertools

import torch

import moe_kernels
from moe_kernels.testing import measure_copy_tbps, report, time_cuda_us, time_cuda_us_interleaved

FP8 = torch.float8_e4m3fn
# "auto" is what users get; the named configurations are timed too, to keep the heuristic honest.
CONFIGS = {
    kind: [c for c in moe_kernels.GEMM_CONFIGS if c == "auto" or c.startswith(kind)]
    for kind in ("fp8", "bf16")
}


def balanced(rows, experts):
    base = [rows // experts] * experts
    for i in range(rows % experts):
        base[i] += 1
    return base


def realistic(rows, experts, gen):
    """Counts of `rows` picks, each drawn uniformly over the experts (a router on random tokens)."""
    picks = torch.randint(experts, (rows,), generator=gen)
    return torch.bincount(picks, minlength=experts).tolist()


def skewed(rows, experts, gen):
    """Token counts from a skewed router: expert popularity ~ Zipf(1), drawn per token."""
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
    picks = torch.multinomial(weights, rows, replacement=True, generator=gen)
    return torch.bincount(picks, minlength=experts).tolist()


# (name, counts, N, K): DeepSeek-V3 H=7168, I=2048 (gate_up N=4096); Qwen3-30B-A3B H=2048, I=768.
def cases(gen):
    return [
        ("EP8 gate_up E=32", realistic(32768, 32, gen), 4096, 7168),
        ("EP8 down E=32", realistic(32768, 32, gen), 7168, 2048),
        ("EP8 gate_up balanced", balanced(32768, 32), 4096, 7168),
        ("EP8 down balanced", balanced(32768, 32), 7168, 2048),
        ("EP8 gate_up skewed", skewed(32768, 32, gen), 4096, 7168),
        ("1 GPU gate_up E=256", realistic(32768, 256, gen), 4096, 7168),
        ("1 GPU down E=256", realistic(32768, 256, gen), 7168, 2048),
        ("1 GPU gate_up E=256 balanced", balanced(32768, 256), 4096, 7168),
        ("decode gate_up E=256", realistic(2048, 256, gen), 4096, 7168),
        ("decode gate_up E=256 balanced", balanced(2048, 256), 4096, 7168),
        ("Qwen3 gate_up E=128", realistic(32768, 128, gen), 1536, 2048),
        ("Qwen3 down E=128", realistic(32768, 128, gen), 2048, 768),
        # Between the tall tiles' 128 rows per expert and kc's 256 (FP8 "auto" switches at 160;
        # last, so that the rows above keep their draws)
        ("1 GPU gate_up E=256 T=6144", realistic(49152, 256, gen), 4096, 7168),
    ]


def rowwise_fp8(x):
    """Per-row FP8 (what torch._scaled_grouped_mm takes): e4m3 values and fp32 scales per row.
    A 3-D tensor is converted one expert at a time (all 256 experts' weights are 15 GB in bf16)."""
    if x.dim() == 3:
        parts = [rowwise_fp8(w) for w in x]
        return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])
    scale = x.float().abs().amax(-1).clamp_min(1e-12) / 448.0
    return (x.float() / scale.unsqueeze(-1)).to(FP8), scale


def gemm_row(name, dtype, counts, n, k, per_config, us_dense, baselines, copy_tbps):
    """One result row: "auto" timings against the dense ceiling and each baseline (name -> µs)."""
    m, us = sum(counts), per_config["auto"]
    flops = 2.0 * m * n * k
    weight_bytes = (1 if dtype == "fp8" else 2) * sum(1 for c in counts if c > 0) * n * k
    return {
        "case": name,
        "dtype": dtype,
        "M": m,
        "N": n,
        "K": k,
        "E": len(counts),
        "us": us,
        "TFLOP/s": flops / (us * 1e-6) / 1e12,
        "% of dense": 100 * us_dense / us,
        "dense TFLOP/s": flops / (us_dense * 1e-6) / 1e12,
        **{ratio: baseline_us / us for ratio, baseline_us in baselines.items()},
        "weights GB/s": weight_bytes / (us * 1e-6) / 1e9,
        "weights % of copy": 100 * weight_bytes / (us * 1e-6) / (copy_tbps * 1e12),
        "best config": min(per_config, key=per_config.get),
        "us per config": per_config,
    }


def scaled_grouped_mm_baseline(a_bf16, b_bf16, offsets):
    """The FP8 baseline, torch._scaled_grouped_mm on rowwise FP8 copies of the operands: a function of
    use_fast_accum, and the rowwise operands (a, a scales, b, b scales)."""
    a_row, sa_row = rowwise_fp8(a_bf16)
    b_row, sb_row = rowwise_fp8(b_bf16)
    ends = offsets[1:].contiguous()

    def scaled_grouped_mm(fast_accum):
        return torch._scaled_grouped_mm(
            a_row,
            b_row.transpose(1, 2),
            sa_row,
            sb_row,
            offs=ends,
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )

    return scaled_grouped_mm, (a_row, sa_row, b_row, sb_row)


def bench_fp8(name, counts, n, k, a_bf16, b_bf16, offsets, dense_cache, copy_tbps):
    """Ours (blockwise scales) vs torch rowwise FP8, and the dense FP8 ceiling."""
    m = sum(counts)
    a, a_scales = moe_kernels.quantize_fp8(a_bf16)
    b, b_scales = moe_kernels.quantize_fp8_weight(b_bf16)
    scaled_grouped_mm, (a_row, sa_row, b_row, sb_row) = scaled_grouped_mm_baseline(a_bf16, b_bf16, offsets)
    # Our configurations and torch's two settings timed in interleaved rounds (same conditions).
    fns = {
        c: lambda c=c: moe_kernels.grouped_gemm(a, b, offsets, a_scales=a_scales, b_scales=b_scales, config=c)
        for c in CONFIGS["fp8"]
    }
    fns["torch fast-accum"] = lambda: scaled_grouped_mm(True)
    fns["torch default"] = lambda: scaled_grouped_mm(False)
    per_config = time_cuda_us_interleaved(fns)
    us_fast, us_default = per_config.pop("torch fast-accum"), per_config.pop("torch default")
    bounds = list(itertools.pairwise([0, *itertools.accumulate(counts)]))

    def scaled_mm_loop():
        for i, (lo, hi) in enumerate(bounds):
            if hi > lo:
                torch._scaled_mm(
                    a_row[lo:hi], b_row[i].T, sa_row[lo:hi, None], sb_row[i][None], out_dtype=torch.bfloat16
                )

    try:
        us_loop = time_cuda_us(scaled_mm_loop, reps=10)
    except RuntimeError:  # cuBLASLt rejects some row counts (e.g. not a multiple of 16)
        us_loop = float("nan")
    if (m, n, k) not in dense_cache:
        dense_b = b_row[0].T
        dense_cache[(m, n, k)] = time_cuda_us(
            lambda: torch._scaled_mm(
                a_row,
                dense_b,
                sa_row[:, None],
                sb_row[0][None],
                out_dtype=torch.bfloat16,
                use_fast_accum=True,
            )
        )
    us_dense = dense_cache[(m, n, k)]
    baselines = {"x torch fast-accum": us_fast, "x torch default": us_default, "x scaled_mm loop": us_loop}
    return gemm_row(name, "fp8", counts, n, k, per_config, us_dense, baselines, copy_tbps)


def bench_bf16(name, counts, n, k, a_bf16, b_bf16, offsets, copy_tbps):
    """Ours vs torch._grouped_mm, and the dense bf16 ceiling."""
    ends = offsets[1:].contiguous()
    fns = {
        c: lambda c=c: moe_kernels.grouped_gemm(a_bf16, b_bf16, offsets, config=c) for c in CONFIGS["bf16"]
    }
    fns["torch"] = lambda: torch._grouped_mm(a_bf16, b_bf16.transpose(1, 2), offs=ends)
    per_config = time_cuda_us_interleaved(fns)
    us_torch = per_config.pop("torch")
    dense_b = b_bf16[0].T
    us_dense = time_cuda_us(lambda: a_bf16 @ dense_b)
    return gemm_row(name, "bf16", counts, n, k, per_config, us_dense, {"x grouped_mm": us_torch}, copy_tbps)


def case_inputs(counts, n, k, fp8=False):
    """A case's operands: (offsets, a_bf16 randn [M, K], b_bf16 randn / sqrt(K) [E, N, K]), drawn
    expert by expert (no fp32 temporary of all experts: 30 GB at 256 experts' gate_up); with fp8
    also the quantised copies (a, a_scales, b, b_scales) as the FP8 rows use them. The prototypes'
    and DeepGEMM's side-by-side benchmarks draw their inputs here too."""
    e, m = len(counts), sum(counts)
    offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device="cuda")
    a_bf16 = torch.randn(m, k, device="cuda").bfloat16()
    b_bf16 = torch.empty(e, n, k, device="cuda", dtype=torch.bfloat16)
    for i in range(e):
        b_bf16[i] = (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()
    if not fp8:
        return offsets, a_bf16, b_bf16
    a, a_scales = moe_kernels.quantize_fp8(a_bf16)
    b, b_scales = moe_kernels.quantize_fp8_weight(b_bf16)
    return offsets, a_bf16, b_bf16, a, a_scales, b, b_scales


def bench_case(name, counts, n, k, dense_cache, copy_tbps):
    offsets, a_bf16, b_bf16 = case_inputs(counts, n, k)
    rows = [bench_fp8(name, counts, n, k, a_bf16, b_bf16, offsets, dense_cache, copy_tbps)]
    torch.cuda.empty_cache()
    rows.append(bench_bf16(name, counts, n, k, a_bf16, b_bf16, offsets, copy_tbps))
    return rows


def main(out_dir="bench/results", copy_tbps=None):
    copy_tbps = copy_tbps or measure_copy_tbps()
    gen = torch.Generator().manual_seed(0)
    dense_cache = {}
    rows = []
    for case in cases(gen):
        rows += bench_case(*case, dense_cache, copy_tbps)
        torch.cuda.empty_cache()
    columns = [
        "case",
        "dtype",
        "E",
        "M",
        "N",
        "K",
        "us",
        "TFLOP/s",
        "% of dense",
        "x torch fast-accum",
        "x torch default",
        "x scaled_mm loop",
        "x grouped_mm",
        "weights GB/s",
        "weights % of copy",
        "best config",
    ]
    title = "Grouped GEMM (ceiling: dense cuBLAS GEMM with the same FLOPs, same run)"
    ratios = ["x torch fast-accum", "x torch default", "x grouped_mm"]
    report(title, "grouped_gemm", rows, columns, out_dir, ratios, {"copy_tbps": copy_tbps})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for grouped_gemm.json")
    main(parser.parse_args().out)
