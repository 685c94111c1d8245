"""Training benchmark: the expert GEMMs' backward, and the MoE layer's forward + backward.

1. dgrad and wgrad alone at the EP8 shapes of DeepSeek-V3 (E = 32 local experts, 32768 rows,
   gate_up: N 4096 x K 7168, down: N 7168 x K 2048). Loads: realistic (a seeded multinomial of the
   rows over uniform experts, as a router draws them) and balanced. Baseline in the same process:
   torch._grouped_mm's autograd (the gradient of that input alone, graph retained). Ours: BF16
   (grouped_gemm_dgrad / grouped_gemm_wgrad, bf16 out) and FP8 (DeepSeek-V3's recipe: dgrad =
   grad 1x128 quantisation + the FP8 GEMM on the transposed weight copy, made once per optimiser
   step and not timed here; wgrad = both operands transposed and quantised 128x1, from the bf16
   gradient and the forward's cached e4m3 input, + the FP8 GEMM).
2. The layer: transformers 5.x's DeepSeek-V3 and Qwen3-30B-A3B blocks (grouped_mm, its fastest
   experts implementation) against MoE.from_transformers(block) on the same tensors, bf16,
   fp8_training=True (FP8 routed experts on the bf16 weights, BF16 wgrads) and with fp8_wgrad too.
   One step = forward + the gradients of the input and every parameter. The router draws the loads
   (uneven). Peak memory: the most a step allocates above what was resident before it (FP8 weight
   copies are reported separately).

Writes train.json (the GEMMs) and train_layer.json (the layers).
"""

import argparse
import time

import torch

from moe_kernels import MoE
from moe_kernels.layers.fp8_training import fp8_weight, make_fp8_weight
from moe_kernels.ops.grouped_gemm import grouped_gemm, grouped_gemm_dgrad, grouped_gemm_wgrad
from moe_kernels.ops.quant import quantize_fp8
from moe_kernels.testing import measure_copy_tbps, rel_error, report, time_cuda_us

EP8_SHAPES = {"gate_up": (4096, 7168), "down": (7168, 2048)}  # (N, K) of each GEMM's weight [E, N, K]
EP8_EXPERTS, EP8_ROWS = 32, 32768
LAYER_CASES = (("deepseek_v3", 4096), ("deepseek_v3", 16384), ("qwen3_moe", 4096), ("qwen3_moe", 16384))


def log(message: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {message}", flush=True)


def loads(gen):
    realistic = torch.multinomial(torch.ones(EP8_EXPERTS), EP8_ROWS, replacement=True, generator=gen)
    return {
        "realistic": torch.bincount(realistic, minlength=EP8_EXPERTS),
        "balanced": torch.full((EP8_EXPERTS,), EP8_ROWS // EP8_EXPERTS),
    }


def gemm_rows(rows, gen):
    for load, counts in loads(gen).items():
        offsets = torch.zeros(EP8_EXPERTS + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        offsets = offsets.cuda()
        for gemm, (n, k) in EP8_SHAPES.items():
            a = torch.randn(EP8_ROWS, k, device="cuda").bfloat16()
            w = (torch.randn(EP8_EXPERTS, n, k, device="cuda") / k**0.5).bfloat16()
            grad_out = torch.randn(EP8_ROWS, n, device="cuda").bfloat16()
            a_leaf, w_leaf = a.clone().requires_grad_(), w.clone().requires_grad_()
            out = torch._grouped_mm(a_leaf, w_leaf.transpose(1, 2), offs=offsets[1:])

            def torch_grad(leaf, out=out, grad_out=grad_out):
                return lambda: torch.autograd.grad(out, [leaf], grad_out, retain_graph=True)

            a_q, a_scales = quantize_fp8(a)
            weight = fp8_weight(w)  # per optimiser step, outside the timing

            def fp8_dgrad(grad_out=grad_out, weight=weight, offsets=offsets):
                g_q, g_scales = quantize_fp8(grad_out)
                return grouped_gemm(g_q, weight.q_t, offsets, a_scales=g_scales, b_scales=weight.scales_t)

            impls = {
                "dgrad": {
                    "torch": torch_grad(a_leaf),
                    "ours bf16": lambda g=grad_out, w=w, o=offsets: grouped_gemm_dgrad(g, w, o),
                    "ours FP8": fp8_dgrad,
                },
                "wgrad": {
                    "torch": torch_grad(w_leaf),
                    "ours bf16": lambda g=grad_out, a=a, o=offsets: grouped_gemm_wgrad(g, a, o),
                    "ours FP8": lambda g=grad_out, q=a_q, s=a_scales, o=offsets: grouped_gemm_wgrad(
                        g, q, o, a_scales=s, fp8=True
                    ),
                    "ours bf16 pingpong": lambda g=grad_out, a=a, o=offsets: grouped_gemm_wgrad(
                        g, a, o, config="pingpong"
                    ),
                    "ours FP8 pingpong": lambda g=grad_out, q=a_q, s=a_scales, o=offsets: grouped_gemm_wgrad(
                        g, q, o, a_scales=s, fp8=True, config="pingpong"
                    ),
                },
            }
            (want_a,) = impls["dgrad"]["torch"]()
            (want_w,) = impls["wgrad"]["torch"]()
            want = {"dgrad": want_a.float(), "wgrad": want_w.float()}
            flops = 2.0 * EP8_ROWS * n * k
            for kind, fns in impls.items():
                times = {name: time_cuda_us(fn, warmup=3, reps=20) for name, fn in fns.items()}
                for name in (n for n in fns if n != "torch"):
                    rows.append(
                        {
                            "case": f"EP8 {gemm} {kind}",
                            "load": load,
                            "max/mean load": float(counts.max() / counts.float().mean()),
                            "impl": name,
                            "us": times[name],
                            "torch us": times["torch"],
                            "TFLOP/s": flops / times[name] / 1e6,
                            "torch TFLOP/s": flops / times["torch"] / 1e6,
                            "x torch": times["torch"] / times[name],
                            "rel err": rel_error(fns[name]().float(), want[kind]),
                        }
                    )
                log(f"{gemm} {kind} {load}: " + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()))
            del out, a_leaf, w_leaf, impls, weight
            torch.cuda.empty_cache()


def step_fn(forward, x, params, grad_out):
    """One training step of a layer: forward, then the gradients of x and of every parameter."""

    def run():
        leaf = x.detach().requires_grad_()
        out = forward(leaf)
        return torch.autograd.grad(out, [leaf, *params], grad_out)

    return run


def chunked_rel_error(got, want) -> float:
    """rel_error over several tensors taken as one vector, in chunks (expert gradients are GBs)."""
    num = den = 0.0
    for g, w in zip(got, want, strict=True):
        for g_chunk, w_chunk in zip(g.split(8), w.split(8), strict=True):
            num += (g_chunk.float() - w_chunk.float()).square().sum().item()
            den += w_chunk.float().square().sum().item()
    return (num / den) ** 0.5


def peak_bytes(fn) -> int:
    """The most a call allocates above what is resident when it starts."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def layer_rows(rows):
    from moe_kernels.testing.transformers_models import real_block

    blocks = {}
    for family, tokens in LAYER_CASES:
        if family not in blocks:
            blocks.clear()
            torch.cuda.empty_cache()
            log(f"{family}: building transformers' block at real dims")
            blocks[family] = real_block(family).train()
        try:
            layer_case(blocks[family], family, tokens, rows)
        except torch.OutOfMemoryError:
            # DeepSeek-V3's training step at real dims needs more than an 80 GB H100 holds: the case
            # is recorded as not run on this GPU and the others still run.
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            reason = f"out of memory on {torch.cuda.get_device_name()} ({total / 2**30:.0f} GiB)"
            log(f"{family} T={tokens}: skipped, {reason}")
            rows.append({"layer": family, "T": tokens, "impl": "all", "skipped": reason})
        torch.cuda.empty_cache()


def layer_case(block, family, tokens, rows):
    """One LAYER_CASES row per implementation of ours: a training step's time, peak memory and the
    gradients' errors against transformers' block."""
    params = [p for p in block.parameters() if p.requires_grad]
    hidden = block.experts.gate_up_proj.shape[2]
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()
    grad_out = torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()

    def transformers_forward(t, block=block):
        block.experts.config._experts_implementation = "grouped_mm"
        return block(t[None])[0]

    ours_bf16 = MoE.from_transformers(block).train()
    ours_fp8 = MoE.from_transformers(block).train()
    ours_fp8.fp8_training = True
    ours_fp8_wgrad = MoE.from_transformers(block).train()
    ours_fp8_wgrad.fp8_training = ours_fp8_wgrad.fp8_wgrad = True
    impls = {
        "transformers grouped_mm": transformers_forward,
        "ours bf16": ours_bf16,
        "ours FP8": ours_fp8,
        "ours FP8 + FP8 wgrad": ours_fp8_wgrad,
    }
    ours_names = [name for name in impls if name.startswith("ours")]
    steps = {name: step_fn(fn, x, params, grad_out) for name, fn in impls.items()}
    want = steps["transformers grouped_mm"]()
    errors = {}
    for name in ours_names:
        got = steps[name]()
        errors[name] = {
            "x": rel_error(got[0].float(), want[0].float()),
            "params": chunked_rel_error(got[1:], want[1:]),
        }
        del got
    del want
    torch.cuda.empty_cache()
    times, peaks = {}, {}
    for name, run in steps.items():
        times[name] = time_cuda_us(run, warmup=2, reps=5)
        peaks[name] = peak_bytes(run)
        log(f"{family} T={tokens}: {name} {times[name] / 1e3:.2f} ms, peak +{peaks[name] / 2**30:.2f} GiB")
    experts = ours_fp8.experts
    cache = [fp8_weight(experts.gate_up_proj), fp8_weight(experts.down_proj)]
    cache_bytes = sum(t.numel() * t.element_size() for w in cache for t in (w.q, w.scales, w.q_t, w.scales_t))
    weights = (experts.gate_up_proj, experts.down_proj)
    quantise_us = time_cuda_us(
        lambda weights=weights: [make_fp8_weight(w) for w in weights], warmup=1, reps=3
    )
    base = times["transformers grouped_mm"]
    for name in ours_names:
        row = {
            "layer": family,
            "T": tokens,
            "impl": name,
            "fwd+bwd ms": times[name] / 1e3,
            "transformers ms": base / 1e3,
            "x transformers": base / times[name],
            "peak GiB": peaks[name] / 2**30,
            "transformers peak GiB": peaks["transformers grouped_mm"] / 2**30,
            "rel err grad x": errors[name]["x"],
            "rel err grad params": errors[name]["params"],
        }
        if name != "ours bf16":
            row["FP8 weight copies GiB"] = cache_bytes / 2**30
            row["weight quantisation ms (per step)"] = quantise_us / 1e3
        rows.append(row)


def main(out_dir="bench/results", copy_tbps=None):
    copy_tbps = copy_tbps or measure_copy_tbps()
    gemm_part, layer_part = [], []
    gemm_rows(gemm_part, torch.Generator().manual_seed(0))
    layer_rows(layer_part)
    report(
        f"Expert GEMM backward at EP8 shapes, {torch.cuda.get_device_name()} (copy {copy_tbps:.2f} TB/s)",
        "train",
        gemm_part,
        [
            "case",
            "load",
            "max/mean load",
            "impl",
            "us",
            "torch us",
            "TFLOP/s",
            "torch TFLOP/s",
            "x torch",
            "rel err",
        ],
        out_dir,
        ["x torch"],
        extra={"copy TB/s": copy_tbps},
    )
    report(
        "MoE layer forward + backward vs transformers grouped_mm",
        "train_layer",
        layer_part,
        [
            "layer",
            "T",
            "impl",
            "fwd+bwd ms",
            "transformers ms",
            "x transformers",
            "peak GiB",
            "transformers peak GiB",
            "rel err grad x",
            "rel err grad params",
            "FP8 weight copies GiB",
            "skipped",
        ],
        out_dir,
        ["x transformers"],
    )
    return gemm_part + layer_part


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for train.json")
    main(parser.parse_args().out)
