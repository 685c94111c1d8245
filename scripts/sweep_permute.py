"""permute / unpermute at bench/bench_permute.py's shapes under the environment's tuning knobs, one
line per shape: `MOE_KERNELS_PDL=0 python scripts/sweep_permute.py` (knobs: MOE_KERNELS_PDL,
MOE_KERNELS_UNPERMUTE_SMEM_KB; SWEEP_SHAPES=N keeps the first N shapes). Knobs are read once per
process, so compare settings in separate runs. unpermute is checked bit-exact against the
reference and permute against the eager rows before anything is timed."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_permute import SHAPES, bytes_moved, check_same_rows, router_ids  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import reference  # noqa: E402
from moe_kernels.testing import measure_copy_tbps, time_cuda_us  # noqa: E402


def sweep_shape(shape, copy_tbps: float, knobs: dict) -> None:
    model, tokens, hidden, experts, top_k = shape
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids = router_ids(tokens, experts, top_k)
    check_same_rows(x, ids, experts)
    p = moe_kernels.permute(x, ids, experts)
    w = torch.rand(tokens, top_k, device="cuda")
    ours = moe_kernels.unpermute(p.out, p.row_map, w)
    assert torch.equal(ours, reference.unpermute(p.out, p.row_map, w)), "unpermute differs"
    nbytes = bytes_moved(tokens, hidden, top_k)
    cases = (
        ("perm bf16", lambda: moe_kernels.permute(x, ids, experts), nbytes["permute bf16"]),
        ("perm fp8", lambda: moe_kernels.permute(x, ids, experts, quantize=True), nbytes["permute fp8"]),
        ("unperm", lambda: moe_kernels.unpermute(p.out, p.row_map, w), nbytes["unpermute"]),
    )
    cells = []
    for name, fn, moved in cases:
        us = time_cuda_us(fn, reps=50)
        pct = 100 * moved / (us * 1e-6) / (copy_tbps * 1e12)
        cells.append(f"{name} {us:7.1f} us {pct:5.1f}%")
    moe_kernels.check_device_errors()
    print(f"{knobs} {model} T={tokens}: " + " | ".join(cells), flush=True)


def main() -> None:
    copy_tbps = measure_copy_tbps()
    knobs = {k: v for k, v in os.environ.items() if k.startswith("MOE_KERNELS_")}
    for shape in SHAPES[: int(os.environ.get("SWEEP_SHAPES", len(SHAPES)))]:
        sweep_shape(shape, copy_tbps, knobs)


if __name__ == "__main__":
    main()
