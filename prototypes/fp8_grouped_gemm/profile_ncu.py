"""One grouped GEMM launch of one case inside the NVTX range "profiled", for Nsight Compute: where do
our kernel's cycles go (L2 -> SM bytes, tensor pipe, stalls) next to CUTLASS's and torch's?

    ncu --nvtx --nvtx-include "profiled/" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section ComputeWorkloadAnalysis --section WarpStateStats -o $OUT/ncu_V2 \\
        python3 prototypes/fp8_grouped_gemm/profile_ncu.py --config V2_BN192_S4 --case ep8_balanced

--config: a prototype config name (ext.cu), "cutlass" (moe_kernels.grouped_gemm, config "auto") or
"torch" (torch._scaled_grouped_mm with fast accumulation, as bench/bench_grouped_gemm.py calls it).
The extension is built (or taken from its cache) as run_gpu.py does; run with PYTHONPATH=$PWD from
the repository root. Two launches run before the range, as warm-up.
"""

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(HERE.parent))

import bench_grouped_gemm as bgg  # noqa: E402 (bench/, on the path above)
import gemm_harness as harness  # noqa: E402 (prototypes/, on the path above)
from run_gpu import BENCH_CASES, case_counts  # noqa: E402 (this folder)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--case", choices=sorted(BENCH_CASES), required=True)
    args = parser.parse_args()

    import moe_kernels

    _, load, rows, experts, n, k = BENCH_CASES[args.case]
    counts = case_counts(bgg, load, rows, experts, torch.Generator().manual_seed(0))
    e, m = len(counts), sum(counts)
    offsets, a_bf16, b_bf16, a, sa, b, sb = bgg.case_inputs(counts, n, k, fp8=True)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    if args.config == "cutlass":
        run = lambda: moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config="auto")  # noqa: E731
    elif args.config == "torch":
        scaled_grouped_mm, _ = bgg.scaled_grouped_mm_baseline(a_bf16, b_bf16, offsets)
        run = lambda: scaled_grouped_mm(True)  # noqa: E731
    else:
        ext, _ = harness.build(HERE, "fp8gemm_proto")
        names = [ext.config_name(c) for c in range(ext.num_configs)]
        if args.config not in names:
            sys.exit(f"unknown config {args.config}; known: {names}, cutlass, torch")
        index = names.index(args.config)
        run = lambda: ext.run(a, sa, b, sb, offsets, out, index)  # noqa: E731
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profiled")
    run()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"{args.config} on {args.case}: E={e} M={m} N={n} K={k}, one launch profiled")


if __name__ == "__main__":
    main()
