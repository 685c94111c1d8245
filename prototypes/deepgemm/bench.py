"""DeepGEMM's Hopper FP8 grouped GEMM beside ours and torch, on the FP8 cases of
bench/bench_grouped_gemm.py.

DeepGEMM (https://github.com/deepseek-ai/DeepGEMM, built from .deepgemm/ by run_gpu.sh):
m_grouped_fp8_gemm_nt_contiguous on sm90 is its 1D2D kernel with fp32 scales, the same recipe as ours
(activations 1x128, weights 128x128, fp32 accumulation promoted every 128 of K). Its "contiguous"
layout wants every expert's rows padded to get_mk_alignment_for_contiguous_layout() (128 on sm90) and
a per-row expert index (-1 on padding rows), or, with use_psum_layout=True, the end of each expert's
real rows (the next expert starts at that end aligned up; timed as a second variant). Its A scales
must be MN-major and TMA-aligned (get_mn_major_tma_aligned_tensor; passed K-major, DeepGEMM would
transpose them in every call). Weights and their [E, N/128, K/128] scales are used as they are.

Loads and inputs are the benchmark's own: bench_grouped_gemm.cases() with the same seeded generator
(realistic multinomial loads and balanced ones), bf16 data as bench_case draws it, quantised with
moe_kernels.quantize_fp8 / quantize_fp8_weight; the torch baseline is its
scaled_grouped_mm_baseline with fast accumulation. Ours is moe_kernels.grouped_gemm(config="auto")
on the unpadded rows. All three are timed by moe_kernels.testing.time_cuda_us_interleaved (CUDA
events, L2 flushed, interleaved rounds) in the same process; TFLOP/s count useful rows only.
"layout us" is what the contiguous layout costs once (pad A and its scales, fill the expert index,
transpose the scales; the per-row destinations come from the host-known counts) and "unpad us" the
gather of the real rows out of DeepGEMM's padded output; neither is in DeepGEMM's GEMM time.

Checks (on the real rows): DeepGEMM's output against ours, ‖dg − ours‖ / ‖ours‖ < 1e-2, and both
against an fp32 reference (dequantise, matmul) on the first and last non-empty expert.

    PYTHONPATH=.deepgemm:/tmp/moe_kernels_site:$PWD python3 prototypes/deepgemm/bench.py --out OUT
    python3 prototypes/deepgemm/bench.py --dry-run     # no GPU: the cases, padded rows, layout self-check

Before timing, each case's DeepGEMM kernels are JIT-compiled in parallel subprocesses (--warm-case;
--no-warm compiles them at first use, one after the other). Exits 1 if a check failed.
"""

import argparse
import itertools
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT / ".deepgemm", ROOT / "bench", ROOT):  # ROOT ends up first
    if path.is_dir() and str(path) not in sys.path:
        sys.path.insert(0, str(path))

FP8 = torch.float8_e4m3fn
# The FP8 rows of bench_grouped_gemm.cases() compared here (its names).
DEFAULT_CASES = (
    "EP8 gate_up E=32",
    "EP8 down E=32",
    "EP8 gate_up balanced",
    "EP8 down balanced",
    "1 GPU gate_up E=256",
    "1 GPU down E=256",
)
MAX_REL_ERROR = 1e-2  # DeepGEMM vs ours: same quantised operands, both fp32-accumulated
MAX_REF_ERROR = 1e-2  # each vs the fp32 reference on the same quantised operands
COLUMNS = [
    "case",
    "E",
    "M",
    "padded M",
    "N",
    "K",
    "ours us",
    "DeepGEMM us",
    "DeepGEMM psum us",
    "torch fast-accum us",
    "ours TFLOP/s",
    "DeepGEMM TFLOP/s",
    "torch TFLOP/s",
    "ours/DeepGEMM",
    "layout us",
    "unpad us",
    "err DG vs ours",
    "check",
]


def bench_cases(patterns):
    """[(name, counts, N, K)] of bench_grouped_gemm.cases(), drawn from the generator seeded as its
    main() seeds it (the realistic loads depend on the draw order, so all cases are drawn). A pattern
    selects the case of that exact name, else every case whose name contains it ("all": every case)."""
    import bench_grouped_gemm  # imports moe_kernels: needs the built extension

    every = bench_grouped_gemm.cases(torch.Generator().manual_seed(0))
    names = [case[0] for case in every]
    chosen = set()
    for pattern in patterns:
        hits = [pattern] if pattern in names else [n for n in names if pattern in n or pattern == "all"]
        if not hits:
            raise SystemExit(f"no case matches {pattern!r}; bench_grouped_gemm has {names}")
        chosen.update(hits)
    return [case for case in every if case[0] in chosen]


def layout_plan(counts, alignment):
    """DeepGEMM's contiguous layout of rows grouped by expert (our layout, `counts` rows each), on the
    host: (dest [M] int64: the padded row of each of our rows, expert [M] int64: its expert,
    m_indices [Mp] int32: the expert of each padded row, -1 on padding, psum [E] int32: the end of
    each expert's real rows, padded row count Mp)."""
    aligned = [-(-c // alignment) * alignment for c in counts]
    starts = torch.tensor([0, *itertools.accumulate(aligned)][:-1], dtype=torch.int64)
    firsts = torch.tensor([0, *itertools.accumulate(counts)][:-1], dtype=torch.int64)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    expert = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    dest = starts[expert] + torch.arange(sum(counts)) - firsts[expert]
    padded = sum(aligned)
    m_indices = torch.full((padded,), -1, dtype=torch.int32)
    m_indices[dest] = expert.int()
    psum = (starts + counts_t).int()
    return dest, expert, m_indices, psum, padded


class Contiguous:
    """Our [M, K] FP8 rows and 1x128 scales laid out for m_grouped_fp8_gemm_nt_contiguous."""

    def __init__(self, dg, counts, k, device):
        self.dg, self.k = dg, k
        dest, expert, _, psum, self.padded = layout_plan(counts, alignment(dg))
        self.dest, self.expert, self.psum = dest.to(device), expert.to(device).int(), psum.to(device)
        # Zeroed once: the padding rows stay zero (build() writes the real rows only).
        self.a = torch.zeros(self.padded, k, dtype=torch.uint8, device=device)
        self.sa = torch.zeros(self.padded, k // 128, dtype=torch.float32, device=device)
        self.m_indices = torch.empty(self.padded, dtype=torch.int32, device=device)
        self.sfa = None

    def build(self, a, sa):
        """The timed layout step (DeepGEMM computes whole 128-row blocks of one expert: the padding
        rows' outputs are computed and discarded)."""
        self.a.index_copy_(0, self.dest, a.view(torch.uint8))
        self.sa.index_copy_(0, self.dest, sa)
        self.m_indices.fill_(-1).index_copy_(0, self.dest, self.expert)
        self.sfa = self.dg.get_mn_major_tma_aligned_tensor(self.sa)
        return self.sfa

    def gemm(self, b, sb, d, psum=False):
        layout = self.psum if psum else self.m_indices
        self.dg.m_grouped_fp8_gemm_nt_contiguous(
            (self.a.view(FP8), self.sfa), (b, sb), d, layout, use_psum_layout=psum
        )
        return d


def alignment(dg):
    # As DeepGEMM's tests: the theoretical alignment (128 on sm90; sm100 picks by expected M).
    dg.set_mk_alignment_for_contiguous_layout(dg.get_theoretical_mk_alignment_for_contiguous_layout())
    return dg.get_mk_alignment_for_contiguous_layout()


def import_deep_gemm():
    import deep_gemm

    return deep_gemm


def warm_case(name):
    """Compile (JIT) this case's DeepGEMM kernels with zero-filled operands of the real shapes: the
    configuration, hence the kernel, depends on N, K, E and the padded row count only."""
    dg = import_deep_gemm()
    (_, counts, n, k) = bench_cases([name])[0]
    e = len(counts)
    lay = Contiguous(dg, counts, k, "cuda")
    a = torch.zeros(sum(counts), k, dtype=torch.uint8, device="cuda").view(FP8)
    sa = torch.ones(sum(counts), k // 128, device="cuda")
    b = torch.zeros(e, n, k, dtype=torch.uint8, device="cuda").view(FP8)
    sb = torch.ones(e, n // 128, k // 128, device="cuda")
    d = torch.empty(lay.padded, n, dtype=torch.bfloat16, device="cuda")
    start = time.perf_counter()
    lay.build(a, sa)
    lay.gemm(b, sb, d)
    lay.gemm(b, sb, d, psum=True)
    torch.cuda.synchronize()
    print(f"warm {name}: {time.perf_counter() - start:.1f} s", flush=True)


def warm(names, timeout_s):
    """Run warm_case for every case in its own process, all at once (nvcc runs single-threaded)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--warm-case", name])
        for name in names
    ]
    for name, proc in zip(names, procs, strict=True):
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        if rc != 0:
            print(f"warm {name}: exit {rc} (its kernels compile at first use)", flush=True)
    print(f"warm-up: {time.perf_counter() - start:.1f} s for {len(names)} cases", flush=True)


def reference_rows(a, sa, b, sb, counts, experts):
    """fp32 reference (dequantise, matmul) of the given experts' rows: {expert: (rows slice, bf16)}."""
    from moe_kernels.reference import dequantize_fp8

    firsts = [0, *itertools.accumulate(counts)]
    out = {}
    for e in experts:
        lo, hi = firsts[e], firsts[e + 1]
        a_e = dequantize_fp8(a[lo:hi], sa[lo:hi], torch.float32)
        out[e] = (slice(lo, hi), (a_e @ dequantize_fp8(b[e], sb[e], torch.float32).T).bfloat16())
    return out


def bench_case(dg, name, counts, n, k, reps):
    import bench_grouped_gemm

    import moe_kernels
    from moe_kernels.testing import rel_error, time_cuda_us, time_cuda_us_interleaved

    e, m = len(counts), sum(counts)
    flops = 2.0 * m * n * k
    torch.manual_seed(0)
    offsets, a_bf16, b_bf16, a, sa, b, sb = bench_grouped_gemm.case_inputs(counts, n, k, fp8=True)
    scaled_grouped_mm, _ = bench_grouped_gemm.scaled_grouped_mm_baseline(a_bf16, b_bf16, offsets)
    del a_bf16, b_bf16
    torch.cuda.empty_cache()

    lay = Contiguous(dg, counts, k, "cuda")
    d = torch.empty(lay.padded, n, dtype=torch.bfloat16, device="cuda")
    d_psum = torch.empty_like(d)
    start = time.perf_counter()
    lay.build(a, sa)
    lay.gemm(b, sb, d)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start

    # Checks on the real rows.
    ours = moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config="auto")
    dg_out = d.index_select(0, lay.dest)
    psum_ok = True
    try:
        lay.gemm(b, sb, d_psum, psum=True)
        err_psum = rel_error(d_psum.index_select(0, lay.dest), ours)
    except RuntimeError as exc:  # a variant DeepGEMM rejects for this shape is reported, not fatal
        print(f"{name}: DeepGEMM psum layout failed: {exc}", flush=True)
        psum_ok, err_psum = False, float("nan")
    err = rel_error(dg_out, ours)
    nonempty = [i for i, c in enumerate(counts) if c > 0]
    refs = reference_rows(a, sa, b, sb, counts, sorted({nonempty[0], nonempty[-1]}))
    err_ours_ref = max(rel_error(ours[rows], ref) for rows, ref in refs.values())
    err_dg_ref = max(rel_error(dg_out[rows], ref) for rows, ref in refs.values())
    ok = err < MAX_REL_ERROR and err_ours_ref < MAX_REF_ERROR and err_dg_ref < MAX_REF_ERROR
    psum_ok = psum_ok and err_psum < MAX_REL_ERROR
    del ours, dg_out

    fns = {
        "ours": lambda: moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config="auto"),
        "DeepGEMM": lambda: lay.gemm(b, sb, d),
        "torch fast-accum": lambda: scaled_grouped_mm(True),
    }
    if psum_ok:
        fns["DeepGEMM psum"] = lambda: lay.gemm(b, sb, d_psum, psum=True)
    us = time_cuda_us_interleaved(fns, reps=reps)
    us_layout = time_cuda_us(lambda: lay.build(a, sa), reps=reps)
    us_unpad = time_cuda_us(lambda: d.index_select(0, lay.dest), reps=reps)
    us_psum = us.get("DeepGEMM psum", float("nan"))
    row = {
        "case": name,
        "E": e,
        "M": m,
        "padded M": lay.padded,
        "N": n,
        "K": k,
        "ours us": us["ours"],
        "DeepGEMM us": us["DeepGEMM"],
        "DeepGEMM psum us": us_psum,
        "torch fast-accum us": us["torch fast-accum"],
        "ours TFLOP/s": flops / us["ours"] / 1e6,
        "DeepGEMM TFLOP/s": flops / us["DeepGEMM"] / 1e6,
        "DeepGEMM psum TFLOP/s": flops / us_psum / 1e6,
        "torch TFLOP/s": flops / us["torch fast-accum"] / 1e6,
        "ours/DeepGEMM": us["ours"] / us["DeepGEMM"],
        "ours/DeepGEMM psum": us["ours"] / us_psum,
        "layout us": us_layout,
        "unpad us": us_unpad,
        "DeepGEMM first call s": first_call_s,
        "err DG vs ours": err,
        "err DG psum vs ours": err_psum,
        "err ours vs ref": err_ours_ref,
        "err DG vs ref": err_dg_ref,
        "check": "ok" if ok else "FAIL",
        "check psum": "ok" if psum_ok else "FAIL",
    }
    print(
        f"{name}: ours {us['ours']:.0f} us, DeepGEMM {us['DeepGEMM']:.0f} (psum {us_psum:.0f}), "
        f"torch {us['torch fast-accum']:.0f}; layout {us_layout:.0f} us, unpad {us_unpad:.0f} us; "
        f"err {err:.2e} (psum {err_psum:.2e}), vs ref ours {err_ours_ref:.2e} DG {err_dg_ref:.2e}; "
        f"first DeepGEMM call {first_call_s:.1f} s",
        flush=True,
    )
    return row


def profile_case(dg, name):
    """One launch each of ours (config "auto") and DeepGEMM inside the NVTX range "profiled", after
    two warm-up launches, for Nsight Compute at its locked clocks:
        ncu --nvtx --nvtx-include "profiled/" --section SpeedOfLight ... python3 bench.py --profile CASE
    """
    import bench_grouped_gemm

    import moe_kernels

    (_, counts, n, k) = bench_cases([name])[0]
    torch.manual_seed(0)
    offsets, _, _, a, sa, b, sb = bench_grouped_gemm.case_inputs(counts, n, k, fp8=True)
    lay = Contiguous(dg, counts, k, "cuda")
    d = torch.empty(lay.padded, n, dtype=torch.bfloat16, device="cuda")
    lay.build(a, sa)
    fns = {
        "ours": lambda: moe_kernels.grouped_gemm(a, b, offsets, a_scales=sa, b_scales=sb, config="auto"),
        "DeepGEMM": lambda: lay.gemm(b, sb, d),
    }
    for fn in fns.values():
        fn()
        fn()
    torch.cuda.synchronize()
    for label, fn in fns.items():
        torch.cuda.nvtx.range_push("profiled")
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"profiled {label} on {name}", flush=True)


def dry_run(names):
    """No GPU needed: the cases, their padded row counts at alignment 128, and a layout self-check."""
    for name, counts, n, k in bench_cases(names):
        *_, padded = layout_plan(counts, 128)
        print(
            f"{name}: E={len(counts)} M={sum(counts)} padded M={padded} N={n} K={k} "
            f"rows per expert {min(counts)}..{max(counts)}"
        )
    counts = [3, 0, 130, 128, 1]
    dest, expert, m_indices, psum, padded = layout_plan(counts, 128)
    assert padded == 128 + 0 + 256 + 128 + 128, padded
    assert m_indices[dest].tolist() == expert.int().tolist() and len(set(dest.tolist())) == sum(counts)
    assert (m_indices == -1).sum().item() == padded - sum(counts)
    assert psum.tolist() == [3, 128, 128 + 130, 384 + 128, 512 + 1], psum.tolist()
    for i, c in enumerate(counts):  # each expert's rows in order from its aligned start
        rows = dest[expert == i].tolist()
        start = (psum[i - 1].item() + 127) // 128 * 128 if i else 0
        assert rows == list(range(start, start + c)), (i, rows)
    print("layout self-check: ok")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results", help="folder for deepgemm.json")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        help="bench_grouped_gemm case names, or parts of names (E=256, down, balanced; all)",
    )
    parser.add_argument("--reps", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument("--no-warm", action="store_true", help="no parallel JIT warm-up")
    parser.add_argument("--warm-timeout", type=float, default=150.0, help="seconds for the warm-up")
    parser.add_argument("--warm-case", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="CPU only: list the cases and self-check")
    parser.add_argument("--profile", metavar="CASE", help="one launch each inside NVTX 'profiled' (for ncu)")
    args = parser.parse_args()
    if args.dry_run:
        dry_run(args.cases)
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench.py needs a Hopper GPU (sm_90); --dry-run runs without one", file=sys.stderr)
        return 2
    if args.warm_case:
        warm_case(args.warm_case)
        return 0
    if args.profile:
        profile_case(import_deep_gemm(), args.profile)
        return 0

    from moe_kernels.testing import report

    dg = import_deep_gemm()
    print(f"deep_gemm {dg.__version__} from {dg.__file__}; JIT cache {os.environ.get('DG_JIT_CACHE_DIR')}")
    cases = bench_cases(args.cases)
    if not args.no_warm:
        warm([case[0] for case in cases], args.warm_timeout)
    rows = []
    for name, counts, n, k in cases:
        try:
            rows.append(bench_case(dg, name, counts, n, k, args.reps))
        except Exception as exc:  # one case failing must not lose the others
            traceback.print_exc()
            rows.append(
                {"case": name, "E": len(counts), "M": sum(counts), "N": n, "K": k, "check": f"ERROR {exc}"}
            )
        torch.cuda.empty_cache()
    bundle = ROOT / ".deepgemm" / "BUNDLE_INFO"
    extra = {
        "deep_gemm": dg.__version__,
        "bundle": bundle.read_text().splitlines() if bundle.exists() else None,
        "alignment": dg.get_mk_alignment_for_contiguous_layout(),
    }
    title = "FP8 grouped GEMM: ours (auto) vs DeepGEMM m_grouped_fp8_gemm_nt_contiguous vs torch fast-accum"
    report(title, "deepgemm", rows, COLUMNS, args.out, ["ours/DeepGEMM"], extra)
    failed = [r["case"] for r in rows if r["check"] != "ok"]
    if failed:
        print(f"CHECK FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
