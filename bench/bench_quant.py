"""FP8 quantisation benchmark: our kernels vs the eager reference and torch.compile of it.

GB/s count the bytes that must move: input read once, e4m3 values and fp32 scales written once;
% of ceiling is against the device-to-device copy bandwidth measured in the same process.
"""

import argparse

import torch

import moe_kernels
from moe_kernels import reference
from moe_kernels.testing import measure_copy_tbps, report, time_cuda_us

# DeepSeek-V3: hidden 7168, routed intermediate 2048; tokens per GPU from decode to prefill.
ACTIVATION_SHAPES = [(128, 7168), (4096, 7168), (32768, 7168), (32768, 2048)]
WEIGHT_SHAPES = [(32, 4096, 7168), (32, 7168, 2048)]  # EP8 gate_up and down of DeepSeek-V3


def bench_case(kind, shape, dtype, copy_tbps):
    x = torch.randn(*shape, device="cuda").to(dtype)
    if kind == "activation":
        ours = lambda: moe_kernels.quantize_fp8(x)
        eager = lambda: reference.quantize_fp8(x)
        scale_bytes = x.numel() // 128 * 4
    else:
        ours = lambda: moe_kernels.quantize_fp8_weight(x)
        eager = lambda: reference.quantize_fp8_weight(x)
        scale_bytes = x.numel() // (128 * 128) * 4
    compiled_fn = torch.compile(
        reference.quantize_fp8 if kind == "activation" else reference.quantize_fp8_weight
    )
    compiled = lambda: compiled_fn(x)
    nbytes = x.numel() * x.element_size() + x.numel() + scale_bytes
    us = time_cuda_us(ours)
    us_eager = time_cuda_us(eager, reps=10)
    us_compiled = time_cuda_us(compiled, reps=10)
    gbps = nbytes / (us * 1e-6) / 1e9
    return {
        "op": f"quantize_fp8 ({kind})",
        "shape": "x".join(map(str, shape)),
        "dtype": str(dtype).removeprefix("torch."),
        "us": us,
        "GB/s": gbps,
        "% of copy": 100 * gbps / (copy_tbps * 1e3),
        "eager us": us_eager,
        "x eager": us_eager / us,
        "compiled us": us_compiled,
        "x compiled": us_compiled / us,
    }


def main(out_dir="bench/results", copy_tbps=None):
    copy_tbps = copy_tbps or measure_copy_tbps()
    rows = [bench_case("activation", s, torch.bfloat16, copy_tbps) for s in ACTIVATION_SHAPES]
    rows.append(bench_case("activation", (32768, 7168), torch.float32, copy_tbps))
    rows += [bench_case("weight", s, torch.bfloat16, copy_tbps) for s in WEIGHT_SHAPES]
    columns = [
        "op",
        "shape",
        "dtype",
        "us",
        "GB/s",
        "% of copy",
        "eager us",
        "x eager",
        "compiled us",
        "x compiled",
    ]
    title = f"FP8 quantisation (copy ceiling {copy_tbps:.2f} TB/s measured)"
    report(title, "quant", rows, columns, out_dir, ["x eager", "x compiled"], {"copy_tbps": copy_tbps})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for quant.json")
    main(parser.parse_args().out)
