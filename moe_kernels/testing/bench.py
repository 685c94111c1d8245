"""Timing, tables and JSON results shared by bench/ (DESIGN.md §6)."""

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

_L2_FLUSH_BYTES = 256 << 20


def time_cuda_us(
    fn: Callable[[], object], *, warmup: int = 5, reps: int = 30, flush_l2: bool = True
) -> float:
    """Median µs of fn() over reps, each timed with CUDA events after an L2 flush (so inputs are
    read from HBM as in a real layer). For kernels of a few µs use time_cuda_graph_us."""
    return time_cuda_us_interleaved({"fn": fn}, warmup=warmup, reps=reps, flush_l2=flush_l2)["fn"]


def time_cuda_us_interleaved(
    fns: Mapping[str, Callable[[], object]], *, warmup: int = 5, reps: int = 30, flush_l2: bool = True
) -> dict[str, float]:
    """{name: median µs} of each fn, timed as time_cuda_us does but in rounds: every round times each
    fn once, starting one name further each round. Timing the candidates one after the other let
    their position in a run move a kernel by 5-10% (clocks and heat drift over a benchmark);
    interleaved, every candidate sees the same conditions."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    torch.cuda.synchronize()
    times = {name: [] for name in names}
    for r in range(reps):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def capture_cuda_graph(fn: Callable[[], object], *, calls: int = 1, warmup: int = 3):
    """(graph, output of the last captured call) of fn() captured `calls` times, after `warmup`
    eager calls on a side stream (as torch.cuda.graph wants: allocator and lazy init settled)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out


def time_cuda_graph_us(fn: Callable[[], object], *, calls_per_graph: int = 20, reps: int = 20) -> float:
    """Median µs per call of fn() replayed from a CUDA graph holding calls_per_graph calls: the
    launch gaps of eager mode are gone, as in a graph-captured decode step."""
    graph, _ = capture_cuda_graph(fn, calls=calls_per_graph)
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


def gpu_time_us(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> tuple[float, int]:
    """(µs of GPU work per call, kernels per call) of fn(), from the profiler's device timestamps:
    the sum over every kernel and memset it launches, without the host time between them. It tells
    what a call costs the GPU when launched behind other work (eager host time then overlaps)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in device_events)
    return total_us / reps, round(len(device_events) / reps)


def host_time_us(fn: Callable[[], object], *, warmup: int = 3, reps: int = 30) -> float:
    """Median host µs for fn() to return (launch cost; the GPU work runs on asynchronously)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e6)
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
    """$GIT_COMMIT when set, else HEAD of the checkout (with -dirty). Set it on the GPU machine: the
    .git there can be older than the tree that was sent (a session's calls all reported its first
    commit)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]  # the checkout holding moe_kernels/
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
