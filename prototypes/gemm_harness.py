"""What the grouped GEMM prototypes' run_gpu.py scripts share: building ext.cu with
torch.utils.cpp_extension (ptxas lines kept), and the driver that checks every config in its own
child process, benchmarks the configs that passed and writes the JSON."""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "-O3",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-Xptxas=-v",
]


@contextlib.contextmanager
def capture_fd(fd):
    """Redirect an OS-level fd (ninja/nvcc write there directly) into a temp file; yields its path."""
    with tempfile.NamedTemporaryFile("w+", delete=False) as f:
        saved = os.dup(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), fd)
        try:
            yield f.name
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)


def find_cuda_home():
    """As setup.py: a root with bin/nvcc and include/cuda_runtime.h (torch's guess from a wrapper
    nvcc on PATH, e.g. /usr/local/bin/nvcc, has no headers)."""
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [str(Path(nvcc).resolve().parent.parent)] if nvcc else []
    candidates += ["/usr/local/cuda"]
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


POISON = 123.0  # fills every output before a checked launch


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; inf where out has a non-finite value."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    d = ref.norm().item()
    return (out - ref).norm().item() / (d if d > 0 else 1.0)


def check_launch(launch, m, n, offsets, refs):
    """(ok, max rel error, message) of launch(out) on a poisoned bf16 out [m, n]: the experts in refs
    ({expert: reference rows}) within 1e-3, every row of [off[0], off[E]) written and finite, the
    rows outside untouched, and a second launch bitwise identical (the kernels are deterministic, so
    a difference is a race: a stage or an epilogue buffer reused too early)."""
    out = torch.full((m, n), POISON, device="cuda", dtype=torch.bfloat16)
    launch(out)
    torch.cuda.synchronize()
    offs = offsets.tolist()
    worst = max((rel_err(out[offs[e] : offs[e + 1]], r) for e, r in refs.items()), default=0.0)
    problems = []
    if not bool((torch.cat([out[: offs[0]], out[offs[-1] :]]) == POISON).all()):
        problems.append("ROWS OUTSIDE THE EXPERTS WERE WRITTEN")
    inside = out[offs[0] : offs[-1]]
    if not bool(torch.isfinite(inside).all()) or bool((inside == POISON).any()):
        problems.append("EXPERT ROWS NOT WRITTEN OR NOT FINITE")
    again = torch.full_like(out, POISON)
    launch(again)
    torch.cuda.synchronize()
    if not torch.equal(out, again):
        problems.append("A SECOND LAUNCH GAVE OTHER BITS")
    return (
        worst < 1e-3 and not problems,
        worst,
        f"max rel err {worst:.2e}" + "".join(f"  {p}" for p in problems),
    )


def build(here, name):
    """Builds here/ext.cu as the extension `name` (cached in a temp folder); returns (ext, ptxas lines)."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    if find_cuda_home():
        os.environ["CUDA_HOME"] = find_cuda_home()  # before torch.utils.cpp_extension is imported
    from torch.utils.cpp_extension import load

    includes = [str(here), str(ROOT / "csrc" / "include")]
    spec = importlib.util.find_spec("nvidia")
    for loc in spec.submodule_search_locations if spec else []:  # pip CUDA headers (cusparse.h, ...)
        if (Path(loc) / "cu13" / "include").exists():
            includes.append(str(Path(loc) / "cu13" / "include"))
    build_dir = Path(tempfile.gettempdir()) / f"{name}_build"
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with capture_fd(1) as out1, capture_fd(2) as out2:
        try:
            ext = load(
                name=name,
                sources=[str(here / "ext.cu")],
                build_directory=str(build_dir),
                extra_cuda_cflags=FLAGS,
                extra_include_paths=includes,
                verbose=True,
            )
            err = None
        except Exception as e:  # noqa: BLE001
            ext, err = None, e
    log = Path(out1).read_text() + Path(out2).read_text()
    stats = [
        line.strip()
        for line in log.splitlines()
        if "ptxas info" in line or "spill" in line or "arning" in line
    ]
    stats_file = build_dir / "ptxas_stats.txt"
    if any("Used" in s for s in stats):
        stats_file.write_text("\n".join(stats))
    elif stats_file.exists():  # cached build: ninja did not recompile
        stats = ["(cached build) " + s for s in stats_file.read_text().splitlines()]
    if err is not None:
        print(log[-6000:])
        raise err
    print(f"built in {time.time() - t0:.0f} s; ptxas:")
    ptx = []
    for s in stats:
        m = re.search(r"Compiling entry function '(\S+)'", s)
        if m:
            ptx.append({"kernel": m.group(1)})
        elif ptx and ("Used" in s or "spill" in s):
            ptx[-1].setdefault("lines", []).append(s)
        elif "Performance Loss" in s:  # e.g. C7518/C7520: wgmma serialized (names its kernel)
            ptx.append({"warning": s})
        if "Compiling entry" in s or "Used" in s or "spill" in s or "arning" in s or "Performance Loss" in s:
            print("   ", s)
    return ext, ptx


def print_row(row, configs, ext, torch_col):
    cols = [ext.config_name(c) for c in configs] + ["cutlass auto", torch_col]
    parts = [f"{c}: {row['us'][c]:8.1f} us {row['TFLOP/s'][c]:6.0f} TF" for c in cols]
    ratio = ""
    if "best proto" in row:
        best, vs_cutlass, vs_torch = row["best proto"], row["x cutlass"], row[f"x {torch_col}"]
        ratio = f" | best {best} x{vs_cutlass:.2f} vs cutlass, x{vs_torch:.2f} vs torch"
    print(f"  {row['case']:38s} " + " | ".join(parts) + ratio, flush=True)


def main(doc, here, name, correctness, bench, check_seconds):
    """The script: build, check every selected config in its own child process (the script run
    again with --check C), benchmark those that passed, write $OUT/{name}.json; 1 if a check
    failed. correctness(ext, config, gen) -> [{"case", "ok", "msg"}]; bench(ext, configs, gen) -> rows."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument(
        "--configs",
        default="all",
        help="comma-separated config names, or 'all' (the default)",
    )
    parser.add_argument("--check", type=int, default=None, help=argparse.SUPPRESS)  # child: one config
    args = parser.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    if args.check is not None:
        with capture_fd(1), capture_fd(2):  # the (cached) build is silent in the child
            ext, _ = build(here, name)
        results = correctness(ext, args.check, torch.Generator().manual_seed(0))
        print("RESULT " + json.dumps(results), flush=True)
        return 0
    ext, ptx = build(here, name)
    names = [ext.config_name(c) for c in range(ext.num_configs)]
    print("configs:", names)
    wanted = names if args.configs == "all" else args.configs.split(",")
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"unknown configs {unknown}; known: {names}")
        return 2
    selected = [names.index(w) for w in wanted]
    print("selected:", [names[c] for c in selected])
    if args.build_only:
        return 0
    print("correctness (one child process per config, run concurrently):")
    checks, passed = {}, []
    procs = {
        c: subprocess.Popen(
            [sys.executable, sys.argv[0], "--check", str(c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        for c in selected
    }
    deadline = time.time() + check_seconds  # all children together; a hang trap fires after a few seconds
    for c, proc in procs.items():
        cname = ext.config_name(c)
        try:
            stdout, stderr = proc.communicate(timeout=max(10.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\n(timeout: hang?)"
        lines = stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
        res = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        if proc.returncode != 0 or not res:
            print(f"  [FAIL] {cname}: child exit code {proc.returncode}\n{stderr[-3000:]}")
            res = [[{"case": "child process", "ok": False, "msg": f"exit code {proc.returncode}"}]]
        checks[cname] = res[0]
        if all(r["ok"] for r in res[0]):
            passed.append(c)
    failed = [ext.config_name(c) for c in selected if c not in passed]
    print(f"passed: {[ext.config_name(c) for c in passed]}  failed: {failed}  ({time.time() - t0:.0f} s)")
    rows = []
    if not args.no_bench and passed:
        print("benchmark (median us, L2 flushed; TFLOP/s of useful rows):")
        try:
            rows = bench(ext, passed, torch.Generator().manual_seed(1))
        except Exception as e:  # noqa: BLE001
            print(f"benchmark failed: {type(e).__name__}: {e}")
    result = {
        "ptxas": ptx,
        "correctness": checks,
        "passed": [ext.config_name(c) for c in passed],
        "failed": failed,
        "bench": rows,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "seconds": time.time() - t0,
    }
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"{name}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        print("wrote", path)
    print(f"total {time.time() - t0:.0f} s")
    if failed:
        print(f"CORRECTNESS FAILED for {failed}")
        return 1
    return 0
