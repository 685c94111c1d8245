"""Errors that only device data can reveal, reported without a host sync on the hot path.

A kernel that meets such an error (an expert id out of range, more rows than num_out_rows, corrupt
expert offsets) handles it safely (drops the pair, clamps the offsets) and stores a code into one
int of pinned host-mapped memory (csrc/common/device_error.h). The front doors of permute,
unpermute and grouped_gemm (so expert_mlp too) read that int with a plain host load at the start of
every call and raise the error of an earlier call, so nothing waits on the GPU;
``check_device_errors()`` synchronises first, for a prompt and certain answer.
"""

import torch

# The codes of csrc/include/moe_kernels/device_error.cuh.
_MESSAGES = {
    1: "permute: expert_ids had values outside [-1, num_experts); those pairs were dropped (row_map -1)",
    2: (
        "permute: num_out_rows was smaller than the rows the routing needs; the pairs that did not fit "
        "were dropped (row_map -1) and expert_offsets clamped to num_out_rows"
    ),
    3: "unpermute: row_map had rows >= the rows of y; those pairs were skipped",
    4: (
        "grouped_gemm: expert_offsets were not non-decreasing within [0, rows of a]; they were clamped "
        "into that range, so the outputs of the experts concerned are wrong"
    ),
    5: "dispatch: expert_ids had values outside [-1, num_experts); those pairs were dropped",
    6: "dispatch: more rows arrived than the dispatch output holds; the rows that did not fit were dropped",
    7: "dispatch: the received counts or meta were inconsistent (corrupt); the rows concerned were dropped",
    8: "dispatch: a rank was sent more rows than its fixed capacity; the rows past it were dropped",
    9: (
        "dispatch/combine (device path): a peer's signal did not arrive within the timeout; the results "
        "of that call are wrong (a peer failed, or ranks called dispatch/combine a different number of times)"
    ),
    10: "balance_loss: expert_ids had values outside [0, num_experts); those picks were not counted",
    11: (
        "balance_loss: seq_offsets were not non-decreasing from 0 to the number of tokens; the loss of "
        "that call is wrong"
    ),
}


def raise_pending_device_error() -> None:
    """Raise RuntimeError for an error a kernel stored during an earlier call, and clear it.

    A host read, no sync: errors of kernels still running show up at a later call. Skipped while
    torch.compile traces (call check_device_errors() outside the compiled region instead).
    """
    if torch.compiler.is_compiling():
        return
    code = torch.ops.moe_kernels.device_error_code()
    if code:
        torch.ops.moe_kernels.clear_device_error()
        what = _MESSAGES.get(code, f"moe_kernels: unknown device error code {code}")
        raise RuntimeError(f"{what} (detected on the device during an earlier call)")


def check_device_errors() -> None:
    """Wait for every GPU of the process, then raise RuntimeError if a kernel reported an error
    it detected in device data (see moe_kernels.permute), and clear it."""
    if torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)
    raise_pending_device_error()
