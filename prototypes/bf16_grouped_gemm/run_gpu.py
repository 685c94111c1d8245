"""Build, check and benchmark the BF16 grouped GEMM prototype (prototypes/bf16_grouped_gemm) on an H200.

    PYTHONPATH=$PWD python3 prototypes/bf16_grouped_gemm/run_gpu.py            # from the repo root
    PYTHONPATH=$PWD python3 prototypes/bf16_grouped_gemm/run_gpu.py --build-only
    PYTHONPATH=$PWD python3 prototypes/bf16_grouped_gemm/run_gpu.py --configs BN256_S4,BN192_S5

(a) builds ext.cu with torch.utils.cpp_extension.load and prints ptxas' register / spill lines (and
    any "wgmma ... serialized" performance warning); (b) checks every config against an fp32
    reference (‖out−ref‖/‖ref‖ < 1e-3 on the expert rows, rows outside the experts must keep their
    poison value), one child process per config; (c) benchmarks the configs that passed against
    moe_kernels.grouped_gemm (CUTLASS BF16, config "auto") and torch._grouped_mm (called as in
    bench/bench_grouped_gemm.py). JSON goes to $OUT/bf16gemm_proto.json when OUT is set.
Exits 1 if any correctness check failed (after benchmarking the configs that passed).
"""

import itertools
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(HERE.parent))

import gemm_harness as harness  # noqa: E402 (prototypes/, on the path above)


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------
def make_inputs(counts, n, k, start=0, tail=0, gen_seed=0):
    """a, b random bf16 (b scaled by 1/sqrt(K) so outputs are O(1)), offsets from the counts with
    `start` unused rows before the first expert and `tail` after the last. The unused rows of a are
    NaN: tail tiles load them, and a kernel that mixed rows would spread the NaN into expert rows."""
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    e = len(counts)
    m = start + sum(counts) + tail
    a = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    a[:start] = float("nan")
    a[m - tail :] = float("nan")
    b = torch.empty(e, n, k, device="cuda", dtype=torch.bfloat16)
    for i in range(e):  # per expert: keeps the fp32 temporary small at the model shapes
        b[i] = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    offsets = torch.tensor(
        list(itertools.accumulate(counts, initial=start)), dtype=torch.int32, device="cuda"
    )
    return a, b, offsets


def reference(a, b, offsets, experts=None):
    """fp32 reference (matmul per expert of the bf16 values in fp32, TF32 off, rounded to bf16).
    Returns {expert: bf16 [rows, N]}. Same math as moe_kernels.reference.grouped_gemm."""
    offs = offsets.tolist()
    out = {}
    for e in experts if experts is not None else range(b.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[e] = (a[lo:hi].float() @ b[e].float().T).bfloat16()
    return out


POISON, rel_err = harness.POISON, harness.rel_err


def check_case(ext, config, inputs, refs):
    """(ok, max rel error over the checked experts, message) of one config on one case."""
    a, b, offsets = inputs
    return harness.check_launch(
        lambda out: ext.run(a, b, offsets, out, config), a.shape[0], b.shape[1], offsets, refs
    )


def correctness(ext, config, gen):
    """All cases for one config; returns [{case, ok, max_rel_err, msg}]. Run in a child process per
    config (see main) so that a device fault or a hang trap of one config spares the others."""
    import bench_grouped_gemm as bgg

    cases = [
        ("E=4 counts [0,1,300,129] N=256 K=512", dict(counts=[0, 1, 300, 129], n=256, k=512), True),
        (
            # N = 320: BN=256 -> a 64-column tail tile (BN256x2: one slab), BN=192 -> 128 columns
            "start 37, tail 50, E=5 N=320 K=704 (odd N tiles)",
            dict(counts=[5, 0, 200, 128, 77], n=320, k=704, start=37, tail=50),
            True,
        ),
        (
            "narrow tiles: E=6 counts [64,1,63,65,127,0] N=512 K=64",
            dict(counts=[64, 1, 63, 65, 127, 0], n=512, k=64, start=3, tail=5),
            True,
        ),
        (
            "all rows on one expert (E=8, 1000 rows) N=448 K=256",
            dict(counts=[0, 0, 0, 1000, 0, 0, 0, 0], n=448, k=256),
            True,
        ),
        ("M_total=0", dict(counts=[0, 0, 0], n=128, k=128), False),
        (
            "all experts empty, 64 poison rows",
            dict(counts=[0, 0, 0, 0], n=256, k=256, start=20, tail=44),
            False,
        ),
        (
            "E=32 realistic N=4096 K=7168 (8 experts checked)",
            dict(counts=bgg.realistic(32768, 32, gen), n=4096, k=7168, experts=[0, 1, 2, 3, 28, 29, 30, 31]),
            False,
        ),
        (
            "E=32 realistic N=7168 K=2048 (4 experts checked)",
            dict(counts=bgg.realistic(32768, 32, gen), n=7168, k=2048, experts=[0, 13, 30, 31]),
            False,
        ),
        (
            "E=256 x 8 rows N=7168 K=2048 (16 checked)",
            dict(counts=bgg.realistic(2048, 256, gen), n=7168, k=2048, experts=list(range(0, 256, 16))),
            False,
        ),
        (
            "E=1024 x ~4 rows N=128 K=128 (all checked)",
            dict(counts=bgg.realistic(4096, 1024, gen), n=128, k=128, start=1, tail=2),
            False,
        ),
    ]
    results = []
    cname = ext.config_name(config)
    for name, kw, cross in cases:
        experts = kw.pop("experts", None)
        inputs = make_inputs(**kw)
        refs = reference(*inputs, experts)
        if cross and inputs[0].shape[0] > 0:  # the local reference against the project's one
            import moe_kernels.reference as R

            full = R.grouped_gemm(inputs[0], inputs[1], inputs[2])
            offs = inputs[2].tolist()
            for e, r in refs.items():
                assert rel_err(full[offs[e] : offs[e + 1]], r) < 1e-5, "local reference disagrees"
        try:
            ok, worst, msg = check_case(ext, config, inputs, refs)
        except Exception as e:  # noqa: BLE001 (a device fault poisons the context: stop here)
            ok, worst, msg = False, float("nan"), f"EXCEPTION {type(e).__name__}: {e}"
        print(f"  [{'PASS' if ok else 'FAIL'}] {cname:12s} {name:55s} {msg}", flush=True)
        results.append({"case": name, "ok": ok, "max_rel_err": worst, "msg": msg})
        if msg.startswith("EXCEPTION"):
            return results
        del inputs, refs
        torch.cuda.empty_cache()
    ok, msg = check_graph_replay(ext, config)
    print(
        f"  [{'PASS' if ok else 'FAIL'}] {cname:12s} {'CUDA graph replay with new offsets':55s} {msg}",
        flush=True,
    )
    results.append({"case": "graph replay", "ok": ok, "msg": msg})
    return results


def check_graph_replay(ext, config):
    """Capture one launch, then change the offsets on the device and replay (the host never reads
    them, so the graph must follow)."""
    try:
        a, b, offsets = make_inputs([100, 50, 0, 106], 256, 256)
        out = torch.full((a.shape[0], 256), POISON, device="cuda", dtype=torch.bfloat16)
        ext.run(a, b, offsets, out, config)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ext.run(a, b, offsets, out, config)
        worst = 0.0
        for counts, start in (([0, 0, 200, 0], 3), ([1, 2, 3, 250], 0), ([64, 64, 64, 0], 10)):
            offsets.copy_(torch.tensor(list(itertools.accumulate(counts, initial=start)), dtype=torch.int32))
            out.fill_(POISON)
            graph.replay()
            torch.cuda.synchronize()
            offs = offsets.tolist()
            refs = reference(a, b, offsets)
            # Over all rows of the experts: one row of 256 values is too few for a relative error
            # below 1e-3 on its own (a single bf16 rounding flip is 2e-4 there).
            ours = torch.cat([out[offs[e] : offs[e + 1]] for e in refs])
            worst = max(worst, rel_err(ours, torch.cat(list(refs.values()))))
            if not bool((torch.cat([out[: offs[0]], out[offs[-1] :]]) == POISON).all()):
                return False, "rows outside the experts were written"
        return worst < 1e-3, f"max rel err {worst:.2e}"
    except Exception as e:  # noqa: BLE001
        return False, f"EXCEPTION {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------
def bench(ext, configs, gen):
    import bench_grouped_gemm as bgg

    cases = [
        ("EP8 gate_up E=32 realistic", bgg.realistic(32768, 32, gen), 4096, 7168),
        ("EP8 down E=32 realistic", bgg.realistic(32768, 32, gen), 7168, 2048),
        ("EP8 gate_up balanced", bgg.balanced(32768, 32), 4096, 7168),
        ("EP8 down balanced", bgg.balanced(32768, 32), 7168, 2048),
        ("256 experts gate_up realistic", bgg.realistic(32768, 256, gen), 4096, 7168),
        ("256 experts down realistic", bgg.realistic(32768, 256, gen), 7168, 2048),
        ("decode 256 experts x 8 rows gate_up", bgg.balanced(2048, 256), 4096, 7168),
    ]
    rows = []
    for case in cases:
        rows.append(bench_case(ext, configs, *case))
        print_row(rows[-1], configs, ext)
        torch.cuda.empty_cache()
    return rows


def bench_case(ext, configs, name, counts, n, k):
    """One benchmark row (a function so that its tensors are freed on return). Inputs from
    bench/bench_grouped_gemm.py's case_inputs: randn a, randn / sqrt(K) b."""
    import bench_grouped_gemm as bgg

    import moe_kernels
    from moe_kernels.testing import time_cuda_us_interleaved

    e, m = len(counts), sum(counts)
    offsets, a, b = bgg.case_inputs(counts, n, k)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    # Every candidate timed in interleaved rounds (a kernel's position in a run moves it by 5-10%).
    fns = {ext.config_name(c): lambda c=c: ext.run(a, b, offsets, out, c) for c in configs}
    fns["cutlass auto"] = lambda: moe_kernels.grouped_gemm(a, b, offsets, config="auto")
    ends = offsets[1:].contiguous()
    try:
        torch._grouped_mm(a, b.transpose(1, 2), offs=ends)
        fns["torch grouped_mm"] = lambda: torch._grouped_mm(a, b.transpose(1, 2), offs=ends)
    except RuntimeError as err:
        print(f"  torch._grouped_mm failed: {err}")
    us = time_cuda_us_interleaved(fns)
    us.setdefault("torch grouped_mm", float("nan"))
    flops = 2.0 * m * n * k
    row = {
        "case": name,
        "E": e,
        "M": m,
        "N": n,
        "K": k,
        "us": us,
        "TFLOP/s": {key: flops / (v * 1e-6) / 1e12 for key, v in us.items()},
    }
    best = min((ext.config_name(c) for c in configs), key=lambda c: us[c], default=None)
    if best is not None:
        row["best proto"] = best
        row["x cutlass"] = us["cutlass auto"] / us[best]
        row["x torch grouped_mm"] = us["torch grouped_mm"] / us[best]
    return row


def print_row(row, configs, ext):
    harness.print_row(row, configs, ext, "torch grouped_mm")


def main():
    return harness.main(__doc__, HERE, "bf16gemm_proto", correctness, bench, check_seconds=240)


if __name__ == "__main__":
    sys.exit(main())
