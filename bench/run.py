"""Run every benchmark family, with DeepSeek-V3 defaults: `python bench/run.py [--out DIR] [--only NAME...]`.

Families: quant, router, permute, grouped_gemm, ep (the expert-parallel steps on one GPU), layer (the
MoE module against transformers' blocks; needs transformers), train (the GEMMs' backward and the layer's
forward + backward; needs transformers). Each prints its table (time, GB/s or
TFLOP/s, % of the measured ceiling, ratio to each baseline) and writes DIR/<family>.json stamped with
device, torch version and git commit.
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_kernels.testing import measure_copy_tbps  # noqa: E402

FAMILIES = ["quant", "router", "permute", "grouped_gemm", "ep", "layer", "train"]


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
        name = family.removeprefix("bench_")
        try:
            module = importlib.import_module(f"bench_{name}")
        except ModuleNotFoundError as e:
            if e.name != "transformers":
                raise
            print(f"skipping the {name} benchmark: it needs transformers (pip install -e .[transformers])")
            continue
        module.main(args.out, copy_tbps=copy_tbps)


if __name__ == "__main__":
    main()
