"""One launcher for multi-process tests: spawn W ranks, run a function on each under a deadline,
collect failures by name, and always tear the process group down.

    failures, exit_codes = run_ranks(worker, world_size=2, backend="gloo", timeout_s=180)

`worker(rank, world_size)` runs inside an initialised process group and returns {case name: None
or failure text} (or raises); every rank's results come back merged by case name. A rank that
hangs is killed at the deadline and reported, so a test never hangs.
"""

import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(worker, rank, world_size, port, backend, results, timeout_s):
    failures = {}
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=torch.device("cuda", rank) if backend == "nccl" else None,
        )
        try:
            for name, text in (worker(rank, world_size) or {}).items():
                if text:
                    failures[name] = f"rank {rank}: {text}"
        finally:
            dist.destroy_process_group()
    except Exception:
        failures["setup"] = f"rank {rank}: {traceback.format_exc()}"
    results.put((rank, failures))


def run_ranks(worker, world_size: int, *, backend: str = "gloo", timeout_s: float = 180.0):
    """Runs worker on world_size spawned ranks. Returns ({case: [failure texts]}, exit codes)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main, args=(worker, r, world_size, port, backend, results, timeout_s), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    failures, deadline = {}, time.monotonic() + timeout_s
    try:
        for _ in procs:
            _, rank_failures = results.get(timeout=max(deadline - time.monotonic(), 1))
            for name, text in rank_failures.items():
                failures.setdefault(name, []).append(text)
    except queue.Empty:
        failures.setdefault("setup", []).append(f"a rank reported nothing within {timeout_s:.0f} s (hang?)")
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 5))
        if p.is_alive():
            p.kill()
            p.join()
    return failures, [p.exitcode for p in procs]


def run_cases(cases: dict, rank: int, world_size: int) -> dict:
    """Runs each named case(rank, world_size) in turn; {name: traceback text} for those that failed.
    Every rank runs every case, so collectives inside the cases stay matched."""
    failures = {}
    for name, case in cases.items():
        try:
            case(rank, world_size)
        except Exception:
            failures[name] = traceback.format_exc()
    return failures
