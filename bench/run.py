"""Run every benchmark family present, with DeepSeek-V3 defaults: `python bench/run.py [--out DIR]`.

Each family prints its table (time, GB/s or TFLOP/s, % of the measured ceiling, ratio to each
baseline) and writes DIR/<family>.json stamped with device, torch version and git commit.
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_kernels.testing import measure_copy_tbps  # noqa: E402

FAMILIES = ["bench_quant", "bench_router", "bench_permute", "bench_grouped_gemm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results")
    parser.add_argument("--only", nargs="*", default=None, help="families to run (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/run.py needs a CUDA GPU (Hopper); see README 'GPU check'.")
    copy_tbps = measure_copy_tbps()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {copy_tbps:.2f} TB/s")
    for family in args.only or FAMILIES:
        importlib.import_module(family).main(args.out, copy_tbps=copy_tbps)


if __name__ == "__main__":
    main()
