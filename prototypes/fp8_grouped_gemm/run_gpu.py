"""Build, check and benchmark the FP8 grouped GEMM prototype (prototypes/fp8_grouped_gemm) on an H200.

    PYTHONPATH=$PWD python3 prototypes/fp8_grouped_gemm/run_gpu.py            # from the repo root
    PYTHONPATH=$PWD python3 prototypes/fp8_grouped_gemm/run_gpu.py --build-only

(a) builds ext.cu with torch.utils.cpp_extension.load and prints ptxas' register / spill lines;
(b) checks every config against an fp32 reference (‖out−ref‖/‖ref‖ < 1e-3 on the expert rows, rows
    outside the experts must keep their poison value); (c) benchmarks the configs that passed against
    moe_kernels.grouped_gemm (CUTLASS, config "auto") and torch._scaled_grouped_mm (fast accum, as in
    bench/bench_grouped_gemm.py). JSON goes to $OUT/fp8gemm_proto.json when OUT is set.
Exits 1 if any correctness check failed (after benchmarking the configs that passed).
"""

import itertools
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(HERE.parent))

import gemm_harness as harness  # noqa: E402 (prototypes/, on the path above)

FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------
def make_inputs(counts, n, k, start=0, tail=0, gen_seed=0):
    """a from quantize_fp8(random bf16) like the project's tests; b random e4m3 with random scales.
    The unused rows of a (`start` before the first expert, `tail` after the last) are NaN: tail tiles
    load them, and a kernel that mixed rows would spread the NaN into expert rows."""
    import moe_kernels

    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    e = len(counts)
    m = start + sum(counts) + tail
    a_bf16 = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    a, sa = (
        moe_kernels.quantize_fp8(a_bf16)
        if m > 0
        else (torch.empty(0, k, device="cuda", dtype=FP8), torch.empty(0, k // 128, device="cuda"))
    )
    a[:start] = float("nan")
    a[m - tail :] = float("nan")
    b = torch.empty(e, n, k, device="cuda", dtype=FP8)
    for i in range(e):  # per expert: keeps the fp32 temporary small at the model shapes
        b[i] = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    sb = torch.rand(e, n // 128, k // 128, device="cuda", generator=g) * 1e-3 + 1e-4
    offsets = torch.tensor(
        list(itertools.accumulate(counts, initial=start)), dtype=torch.int32, device="cuda"
    )
    return a, sa, b, sb, offsets


def reference(a, sa, b, sb, offsets, experts=None):
    """fp32 reference (dequantise, matmul per expert, round to bf16), expert by expert to save memory.
    Returns {expert: bf16 [rows, N]}. Same math as moe_kernels.reference.grouped_gemm."""
    from moe_kernels.reference import dequantize_fp8

    offs = offsets.tolist()
    out = {}
    for e in experts if experts is not None else range(b.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            af = dequantize_fp8(a[lo:hi], sa[lo:hi], torch.float32)
            bf = dequantize_fp8(b[e], sb[e], torch.float32)
            out[e] = (af @ bf.T).bfloat16()
    return out


POISON, rel_err = harness.POISON, harness.rel_err


def takes_mn_major_scales(name):
    """The *_TS configs (scales by TMA) read the a scales MN-major."""
    return name.endswith("_TS")


def mn_major(sa):
    """The [M, K/128] a scales as an MN-major view (strides (1, ld), ld = M rounded up to 4: 16-B
    rows for the TMA), as DeepGEMM's get_mn_major_tma_aligned_tensor lays them out."""
    m, kb = sa.shape
    ld = (m + 3) // 4 * 4
    buf = torch.zeros(kb, ld, device=sa.device, dtype=sa.dtype)
    buf[:, :m] = sa.t()
    return buf[:, :m].t()


def scales_for(ext, config, sa):
    return mn_major(sa) if takes_mn_major_scales(ext.config_name(config)) else sa


def check_case(ext, config, inputs, refs):
    """(ok, max rel error over the checked experts, message) of one config on one case."""
    a, sa, b, sb, offsets = inputs
    sa = scales_for(ext, config, sa)
    return harness.check_launch(
        lambda out: ext.run(a, sa, b, sb, offsets, out, config), a.shape[0], b.shape[1], offsets, refs
    )


def check_refusal(ext, config, inputs):
    """(ok, message): a *_TS config must refuse K / 128 not a multiple of 4 with an error."""
    a, sa, b, sb, offsets = inputs
    out = torch.empty(a.shape[0], b.shape[1], device="cuda", dtype=torch.bfloat16)
    try:
        ext.run(a, scales_for(ext, config, sa), b, sb, offsets, out, config)
    except RuntimeError as e:
        return True, f"refused as it must: {str(e).splitlines()[0][:80]}"
    return False, "ACCEPTED A K IT CANNOT TAKE"


def correctness(ext, config, gen):
    """All cases for one config; returns [{case, ok, max_rel_err, msg}]. Run in a child process per
    config (see main) so that a device fault or a hang trap of one config spares the others."""
    import bench_grouped_gemm as bgg

    cases = [
        ("E=4 counts [0,1,300,129] N=256 K=512", dict(counts=[0, 1, 300, 129], n=256, k=512), True),
        (
            "start 37, tail 50, E=5 N=384 K=1024",
            dict(counts=[5, 0, 200, 128, 77], n=384, k=1024, start=37, tail=50),
            True,
        ),
        (
            "all rows on one expert (E=8, 1000 rows) N=512 K=512",
            dict(counts=[0, 0, 0, 1000, 0, 0, 0, 0], n=512, k=512),
            True,
        ),
        (
            # Tiles of <= 64 rows (the *_NS configs split their columns between the warpgroups)
            # with N = 512: the last 192-column tile has 128 columns, its second half only 32.
            # Poison rows on both sides catch stores past a split tile's rows.
            "narrow tiles, start 5, tail 61, E=4 counts [40,0,64,3] N=512 K=512",
            dict(counts=[40, 0, 64, 3], n=512, k=512, start=5, tail=61),
            True,
        ),
        (
            # 17 m-tiles (the last of 5 rows): a second band of the tile walk, an odd m-tile count
            # (a ghost in the V4 clusters, whose second band holds one unit), a split tail.
            "one expert of 2053 rows, tail 40, N=512 K=512",
            dict(counts=[2053], n=512, k=512, tail=40),
            False,
        ),
        ("N=128 (one n-block), E=3 counts [70,0,9]", dict(counts=[70, 0, 9], n=128, k=384), True),
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
            "E=256 x 8 rows N=7168 K=2048 (16 checked)",
            dict(counts=bgg.realistic(2048, 256, gen), n=7168, k=2048, experts=list(range(0, 256, 16))),
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

            full = R.grouped_gemm(inputs[0], inputs[2], inputs[4], a_scales=inputs[1], b_scales=inputs[3])
            offs = inputs[4].tolist()
            for e, r in refs.items():
                assert rel_err(full[offs[e] : offs[e + 1]], r) < 1e-5, "local reference disagrees"
        try:
            if takes_mn_major_scales(cname) and (kw["k"] // 128) % 4:
                (ok, msg), worst = check_refusal(ext, config, inputs), 0.0
            else:
                ok, worst, msg = check_case(ext, config, inputs, refs)
        except Exception as e:  # noqa: BLE001 (a device fault poisons the context: stop here)
            ok, worst, msg = False, float("nan"), f"EXCEPTION {type(e).__name__}: {e}"
        print(f"  [{'PASS' if ok else 'FAIL'}] {cname:10s} {name:55s} {msg}", flush=True)
        results.append({"case": name, "ok": ok, "max_rel_err": worst, "msg": msg})
        if msg.startswith("EXCEPTION"):
            break
        del inputs, refs
        torch.cuda.empty_cache()
    ok, msg = check_graph_replay(ext, config)
    print(
        f"  [{'PASS' if ok else 'FAIL'}] {cname:10s} {'CUDA graph replay with new offsets':55s} {msg}",
        flush=True,
    )
    results.append({"case": "graph replay", "ok": ok, "msg": msg})
    return results


def check_graph_replay(ext, config):
    """Capture one launch, then change the offsets on the device and replay (the host never reads
    them, so the graph must follow)."""
    try:
        a, sa, b, sb, offsets = make_inputs([100, 50, 0, 106], 256, 512)
        sa_run = scales_for(ext, config, sa)
        out = torch.full((a.shape[0], 256), POISON, device="cuda", dtype=torch.bfloat16)
        ext.run(a, sa_run, b, sb, offsets, out, config)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ext.run(a, sa_run, b, sb, offsets, out, config)
        worst = 0.0
        for counts, start in (([0, 0, 200, 0], 3), ([1, 2, 3, 250], 0), ([64, 64, 64, 0], 10)):
            offsets.copy_(torch.tensor(list(itertools.accumulate(counts, initial=start)), dtype=torch.int32))
            out.fill_(POISON)
            graph.replay()
            torch.cuda.synchronize()
            offs = offsets.tolist()
            refs = reference(a, sa, b, sb, offsets)
            # Over all rows of the experts: one row of 256 values rounded to bf16 is too few for a
            # relative error below 1e-3 on its own (a single bf16 rounding flip is 2e-4 there).
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
# The benchmark's cases: key (profile_ncu.py's --case) -> (name, load, rows, experts, N, K); the
# load is bench_grouped_gemm's: "realistic" (drawn per token) or "balanced".
BENCH_CASES = {
    "ep8_realistic": ("EP8 gate_up E=32 realistic", "realistic", 32768, 32, 4096, 7168),
    "ep8_down": ("EP8 down E=32 realistic", "realistic", 32768, 32, 7168, 2048),
    "ep8_balanced": ("EP8 gate_up balanced", "balanced", 32768, 32, 4096, 7168),
    "e256_realistic": ("256 experts gate_up realistic", "realistic", 32768, 256, 4096, 7168),
    "e256_down": ("256 experts down realistic", "realistic", 32768, 256, 7168, 2048),
    "decode": ("decode 256 experts x 8 rows gate_up", "balanced", 2048, 256, 4096, 7168),
}


def case_counts(bgg, load, rows, experts, gen):
    """Rows per expert of a BENCH_CASES load (bgg: the bench_grouped_gemm module)."""
    return bgg.realistic(rows, experts, gen) if load == "realistic" else bgg.balanced(rows, experts)


def bench(ext, configs, gen):
    import bench_grouped_gemm as bgg

    rows = []
    # PROTO_CASES: comma-separated BENCH_CASES keys to run (all by default), for a short device call.
    only = os.environ.get("PROTO_CASES")
    for key, (name, load, m, e, n, k) in BENCH_CASES.items():
        if only and key not in only.split(","):
            continue
        rows.append(bench_case(ext, configs, name, case_counts(bgg, load, m, e, gen), n, k))
        print_row(rows[-1], configs, ext)
        torch.cuda.empty_cache()
    return rows


def bench_case(ext, configs, name, counts, n, k):
    """One benchmark row (a function so that its ~30 GB of tensors are freed on return)."""
    import bench_grouped_gemm as bgg

    import moe_kernels
    from moe_kernels.testing import time_cuda_us_interleaved

    e, m = len(counts), sum(counts)
    offsets, a_bf16, b_bf16, a, sa, b, sb = bgg.case_inputs(counts, n, k, fp8=True)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    # Every candidate timed in interleaved rounds: timed one after the other, a kernel's position in
    # the run moved it by 5-10%.
    # The *_TS configs' MN-major layout, made once outside the timing (as DeepGEMM's bench does).
    ts = {c: takes_mn_major_scales(ext.config_name(c)) for c in configs}
    sa_mn = mn_major(sa) if any(ts.values()) else None
    fns = {
        ext.config_name(c): lambda c=c, s=(sa_mn if ts[c] else sa): ext.run(a, s, b, sb, offsets, out, c)
        for c in configs
    }
    fns["cutlass auto"] = lambda: moe_kernels.grouped_gemm(
        a, b, offsets, a_scales=sa, b_scales=sb, config="auto"
    )
    # torch._scaled_grouped_mm with rowwise scales, the baseline of bench_grouped_gemm
    scaled_grouped_mm, _ = bgg.scaled_grouped_mm_baseline(a_bf16, b_bf16, offsets)
    del a_bf16, b_bf16
    try:
        scaled_grouped_mm(True)
        fns["torch fast-accum"] = lambda: scaled_grouped_mm(True)
    except RuntimeError as err:
        print(f"  torch._scaled_grouped_mm failed: {err}")
    us = time_cuda_us_interleaved(fns)
    us.setdefault("torch fast-accum", float("nan"))
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
        row["x torch fast-accum"] = us["torch fast-accum"] / us[best]
    return row


def print_row(row, configs, ext):
    harness.print_row(row, configs, ext, "torch fast-accum")


def main():
    return harness.main(__doc__, HERE, "fp8gemm_proto", correctness, bench, check_seconds=150)


if __name__ == "__main__":
    sys.exit(main())
