"""Error metrics, tolerances and benchmark helpers shared by tests/ and bench/ (DESIGN.md §6).

Tolerances are written down once, here, per precision family:
    FP8 GEMMs          calc_diff(out, ref) < FP8_GEMM_CALC_DIFF, against the reference run on the
                       same quantised inputs
    bf16 arithmetic    rel_error(out, ref) <= BF16_ERROR_FACTOR * rel_error(torch's own bf16, ref)
    router weights     fp32 arithmetic: ROUTER_WEIGHT_RTOL / ROUTER_WEIGHT_ATOL
    data movement and FP8 quantisation: bit-exact (torch.equal on the raw bytes)
"""

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

FP8_GEMM_CALC_DIFF = 1e-3
BF16_ERROR_FACTOR = 2.0
ROUTER_WEIGHT_RTOL = 1e-5
ROUTER_WEIGHT_ATOL = 1e-6

# ------------------------------------------------------------------------------------------------
# Error metrics
# ------------------------------------------------------------------------------------------------


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf if out has a NaN or inf that ref has not)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error 1 − 2<x,y> / (<x,x> + <y,y>) in float64 (0 when equal)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum().item()
    return 0.0 if denom == 0 else 1.0 - 2.0 * (x * y).sum().item() / denom


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """Exact equality of values and raw bytes; NaNs must sit in the same places (any NaN pattern)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (
        f"{msg}: shape/dtype {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}"
    )
    out_nan, ref_nan = torch.isnan(out.float()), torch.isnan(ref.float())
    assert torch.equal(out_nan, ref_nan), (
        f"{msg}: NaN positions differ ({int((out_nan != ref_nan).sum())} places)"
    )
    raw_out, raw_ref = _raw_bytes(out)[~_byte_mask(out_nan, out)], _raw_bytes(ref)[~_byte_mask(ref_nan, ref)]
    if not torch.equal(raw_out, raw_ref):
        mismatch = (out.float() != ref.float()) & ~out_nan
        first = mismatch.nonzero()[:3].tolist()
        raise AssertionError(f"{msg}: {int(mismatch.sum())} elements differ, first at {first}")


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(*t.shape, t.element_size())


def _byte_mask(nan: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nan.unsqueeze(-1).expand(*t.shape, t.element_size())


def poison_allocator_(device: str = "cuda", nbytes: int = 64 << 20) -> None:
    """Fill free blocks of torch's caching allocator with 0xFF bytes (NaN in fp32, bf16 and e4m3)
    so that outputs an op allocates start poisoned: an element the kernel forgets to write shows up
    as NaN in a bit-exact comparison."""
    sizes = [nbytes >> s for s in range(0, 16, 2)] + [512 * (1 << s) for s in range(12)]
    blocks = [torch.empty(n, dtype=torch.uint8, device=device).fill_(0xFF) for n in sizes]
    del blocks


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

_L2_FLUSH_BYTES = 256 << 20


def time_cuda_us(
    fn: Callable[[], object], *, warmup: int = 5, reps: int = 30, flush_l2: bool = True
) -> float:
    """Median µs of fn() over reps, each timed with CUDA events after an L2 flush (so inputs are
    read from HBM as in a real layer). For kernels of a few µs use time_cuda_graph_us."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_cuda_graph_us(fn: Callable[[], object], *, calls_per_graph: int = 20, reps: int = 20) -> float:
    """Median µs per call of fn() replayed from a CUDA graph holding calls_per_graph calls: the
    launch gaps of eager mode are gone, as in a graph-captured decode step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    return statistics.median(times)


def measure_copy_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus written (the ceiling of
    memory-bound kernels, measured in the same process as the benchmark)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = time_cuda_us(lambda: dst.copy_(src), flush_l2=False, reps=20)
    return nbytes / (us * 1e-6) / 1e12


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """One aligned row per entry; floats with 3 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    table = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print(" | ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)))


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0]
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp()) if values else float("nan")


def report(
    title: str,
    benchmark: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    out_dir: str | Path,
    ratio_columns: Sequence[str],
    extra: dict | None = None,
) -> None:
    """What every benchmark ends with: the table, the geometric mean of each ratio column (over
    the rows that have it), and out_dir/<benchmark>.json."""
    print_table(title, rows, columns)
    means = [f"{c} {geomean([r[c] for r in rows if c in r]):.2f}" for c in ratio_columns]
    print("geomean " + ", ".join(means))
    write_json(Path(out_dir) / f"{benchmark}.json", benchmark, rows, extra)


def git_commit() -> str:
    """HEAD of the checkout (with -dirty), or $GIT_COMMIT where there is no .git (the GPU machine)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Device name, torch and CUDA versions, git commit, date: stamped into every JSON result."""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": props.name, "sm_count": props.multi_processor_count}
    return info


def write_json(path: str | Path, benchmark: str, rows: Sequence[dict], extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "environment": environment(), **(extra or {}), "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------
# Router selection: exact where the choice is clear, tolerant of fp32 near-ties
# ------------------------------------------------------------------------------------------------

ROUTER_SEL_TOL = 1e-5


def _check_token_selection(sel, ids, top_k, num_groups, topk_groups, group_score, tol) -> str | None:
    """Why `ids` is not a valid pick from one token's fp32 sel values within tol (None if it is).

    Valid: some choice of kept groups consistent with the group scores up to tol, and within those
    groups K experts whose sel values equal the K largest up to tol."""
    e = sel.shape[0]
    if len(set(ids.tolist())) != top_k or ids.min() < 0 or ids.max() >= e:
        return f"ids {ids.tolist()} not {top_k} distinct experts in [0, {e})"
    sel = torch.where(torch.isnan(sel), torch.full_like(sel, float("-inf")), sel).double()
    if num_groups > 1:
        grouped = sel.view(num_groups, -1)
        gs = (
            grouped.sort(-1, descending=True).values[:, :2].sum(-1)
            if group_score == "top2_sum"
            else grouped.amax(-1)
        )
        gs = torch.where(torch.isnan(gs), torch.full_like(gs, float("-inf")), gs)
        boundary = gs.sort(descending=True).values[topk_groups - 1]
        sure = set((gs > boundary + tol).nonzero().flatten().tolist())
        maybe = set(((gs - boundary).abs() <= tol).nonzero().flatten().tolist()) | set(
            (gs == boundary).nonzero().flatten().tolist()
        )
        picked_groups = set((ids // (e // num_groups)).tolist())
        if not picked_groups <= sure | maybe or len(sure | picked_groups) > topk_groups:
            return f"ids {ids.tolist()} use groups {sorted(picked_groups)}, group scores {gs.tolist()}"
        kept = sure | picked_groups
        for g in sorted(maybe - kept, key=lambda g: grouped[g].max().item()):
            if len(kept) < topk_groups:
                kept.add(g)
        mask = torch.zeros(num_groups, dtype=torch.bool)
        mask[list(kept)] = True
        sel = torch.where(mask.repeat_interleave(e // num_groups), sel, torch.full_like(sel, float("-inf")))
    best = sel.sort(descending=True).values[:top_k]
    got = sel[ids].sort(descending=True).values
    close = (got == best) | ((got - best).abs() <= tol)
    if not bool(close.all()):
        return f"sel at ids {got.tolist()} != top-{top_k} sel {best.tolist()}"
    return None


def assert_router_matches_reference(logits, weights, ids, top_k, *, bias=None, tol=ROUTER_SEL_TOL, **config):
    """Check a router's (weights, ids) against reference.router on the same inputs.

    Rows whose ids equal the reference's exactly pass at once; any other row must be a valid pick
    under fp32 near-ties (see _check_token_selection). Weights are compared with the reference's
    weights recomputed at the kernel's ids, to ROUTER_WEIGHT_RTOL / ROUTER_WEIGHT_ATOL."""
    from moe_kernels import reference

    logits, weights, ids = logits.cpu(), weights.cpu(), ids.cpu().long()
    bias = None if bias is None else bias.cpu()
    _, ref_ids, _ = reference.router(logits, top_k, bias=bias, **config)
    scores = reference.router_scores(logits, config.get("score_func", "softmax"))
    sel = scores if bias is None else scores + bias
    for t in (ids != ref_ids.long()).any(-1).nonzero().flatten().tolist():
        why = _check_token_selection(
            sel[t],
            ids[t],
            top_k,
            config.get("num_groups", 1),
            config.get("topk_groups", 1),
            config.get("group_score", "top2_sum"),
            tol,
        )
        assert why is None, f"token {t}: {why} (reference ids {ref_ids[t].tolist()})"
    expected = scores.gather(1, ids)
    if config.get("renormalize", True):
        expected = expected / (expected.sum(-1, keepdim=True) + reference.RENORM_EPS)
    expected = expected * config.get("scaling_factor", 1.0)
    scale = max(1.0, abs(config.get("scaling_factor", 1.0)))
    torch.testing.assert_close(
        weights, expected, rtol=ROUTER_WEIGHT_RTOL, atol=ROUTER_WEIGHT_ATOL * scale, equal_nan=True
    )
