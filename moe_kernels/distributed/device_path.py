"""The device path of expert parallelism (ep-design.md §3(c)3): rows stored straight into the
other ranks' symmetric windows, counts and flags published with system-scope releases, flags
awaited with acquire loads under a timeout. No host step, so dispatch and combine can be captured
in a CUDA graph; only real rows cross (each rank's region holds up to max_tokens_per_rank rows).

A rank's window (the same layout on every rank; source s owns region s of each area):
    rows    [W * C, H] 2-byte or e4m3 rows        scales  [W * C, H/128] fp32 (FP8 rows)
    meta    [W * C, 3, K] int32                    counts  [W, 1 + L] int32 (what s sent)
    flags   [W] int64 (dispatch epoch of s)        back    [W * C, H] combine partial sums
    back_flags [W] int64 (combine epoch of s)
DeviceExchange is one rank's end: ExpertParallel runs its send then its receive; the loopback
runs every virtual rank's send, then every receive.
"""

from dataclasses import dataclass

import torch

from moe_kernels._checks import FP8, QUANT_BLOCK, check

_ALIGN = 256  # bytes between areas


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class WindowLayout:
    num_ranks: int
    capacity: int
    hidden: int
    top_k: int
    count_cols: int
    rows: int
    scales: int
    meta: int
    counts: int
    flags: int
    back: int
    back_flags: int
    bytes: int

    @classmethod
    def build(cls, num_ranks: int, capacity: int, hidden: int, top_k: int, count_cols: int) -> "WindowLayout":
        slots = num_ranks * capacity
        sizes = [
            slots * hidden * 2,  # rows: 2-byte (bf16 / fp16) or 1-byte e4m3
            slots * (hidden // QUANT_BLOCK) * 4,  # scales
            slots * 3 * top_k * 4,  # meta
            num_ranks * count_cols * 4,  # counts
            num_ranks * 8,  # flags
            slots * hidden * 2,  # back: 2-byte partial sums
            num_ranks * 8,  # back flags
        ]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += _round_up(size)
        return cls(num_ranks, capacity, hidden, top_k, count_cols, *offsets, total)


class DeviceExchange:
    """One rank's end of the device path: its window (a uint8 tensor), every rank's window address
    on this GPU (peers, int64 [W]), and its dispatch and combine epochs."""

    def __init__(self, layout: WindowLayout, window: torch.Tensor, peers: torch.Tensor, rank: int,
                 timeout_s: float = 30.0):  # fmt: skip
        self.layout, self.window, self.peers, self.rank = layout, window, peers, rank
        self.timeout_s = timeout_s
        self.epochs = torch.zeros(2, dtype=torch.int64, device=window.device)  # dispatch, combine

    def _view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        return self.window[offset : offset + nbytes].view(dtype).view(shape)

    def check_rows(self, dtype: torch.dtype, op: str) -> None:
        check(
            dtype in (torch.bfloat16, torch.float16, FP8),
            op,
            f"the device path moves bfloat16, float16 or float8_e4m3fn rows, got {dtype}",
        )

    # -- dispatch --------------------------------------------------------------------------------
    def dispatch_send(self, plan) -> None:
        """Push this rank's staged rows (capacity layout), scales and meta, then signal."""
        lay, push = self.layout, torch.ops.moe_kernels.ep_push_rows
        counts = plan.send_counts
        cols = lay.count_cols
        push(self.peers, self.rank, lay.capacity, counts, cols, plan.send_x.view(torch.uint8), lay.rows)
        if plan.send_scales is not None:
            push(self.peers, self.rank, lay.capacity, counts, cols, plan.send_scales, lay.scales)
        push(self.peers, self.rank, lay.capacity, counts, cols, plan.meta, lay.meta)
        torch.ops.moe_kernels.ep_signal(
            self.peers, self.rank, lay.flags, counts, lay.counts, self.epochs[0:1]
        )

    def dispatch_receive(self, row_dtype: torch.dtype):
        """Wait for every source, then (rows, scales or None, meta, counts) of the window."""
        lay = self.layout
        slots = lay.num_ranks * lay.capacity
        torch.ops.moe_kernels.ep_wait(
            self._view(lay.flags, torch.int64, (lay.num_ranks,)), self.epochs[0:1], self.timeout_s
        )
        rows = self._view(lay.rows, torch.uint8, (slots, lay.hidden * row_dtype.itemsize)).view(row_dtype)
        scales = (
            self._view(lay.scales, torch.float32, (slots, lay.hidden // QUANT_BLOCK))
            if row_dtype == FP8
            else None
        )
        meta = self._view(lay.meta, torch.int32, (slots, 3, lay.top_k))
        counts = self._view(lay.counts, torch.int32, (lay.num_ranks, lay.count_cols)).clone()
        return rows, scales, meta, counts

    # -- combine ---------------------------------------------------------------------------------
    def combine_send(self, partials: torch.Tensor, recv_counts: torch.Tensor) -> None:
        """Push each source's partial sums (rows [s * C, + rows received from s)) into its window."""
        lay = self.layout
        torch.ops.moe_kernels.ep_push_rows(
            self.peers, self.rank, lay.capacity, recv_counts, lay.count_cols, partials, lay.back
        )
        torch.ops.moe_kernels.ep_signal(self.peers, self.rank, lay.back_flags, None, 0, self.epochs[1:2])

    def combine_receive(self, dtype: torch.dtype) -> torch.Tensor:
        """Wait for every rank's partial sums: [W * C, H] rows, region r from rank r."""
        lay = self.layout
        torch.ops.moe_kernels.ep_wait(
            self._view(lay.back_flags, torch.int64, (lay.num_ranks,)), self.epochs[1:2], self.timeout_s
        )
        return self._view(lay.back, dtype, (lay.num_ranks * lay.capacity, lay.hidden))
