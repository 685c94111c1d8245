"""The device path of expert parallelism (ep-design.md §3(c)3): rows stored straight into the
other ranks' symmetric windows, counts and flags published with system-scope releases, flags
awaited with acquire loads under a timeout. No host step, so dispatch and combine can be captured
in a CUDA graph; only real rows cross (each rank's region holds up to max_tokens_per_rank rows).

A rank's window (the same layout on every rank; source s owns region s of each area):
    rows    [W * C, H] 2-byte or e4m3 rows        scales  [W * C, H/128] fp32 (FP8 rows)
    meta    [W * C, 3, K] int32                    counts  [W, 1 + L] int32 (what s sent)
    flags   [W] int64 (epoch of s)                 back    [W * C, H] combine partial sums
    back_flags [W] int64                           wgrad   [W * C, K] fp32 gate-weight gradients
    wgrad_flags [W] int64
Backward reuses them: combine's backward sends gradient rows through `rows` and the weights'
gradients back through `wgrad`; dispatch's backward is a combine through `back`. Consecutive
operations never write the same area, so each write of an area is ordered after the peers' reads
of its previous contents by a wait in between (on a signal the peer sent after those reads).
DeviceExchange is one rank's end: ExpertParallel runs its send then its receive; the loopback
runs every virtual rank's send, then every receive.
"""

import math
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
    wgrad: int
    wgrad_flags: int
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
            slots * top_k * 4,  # wgrad
            num_ranks * 8,  # wgrad flags
        ]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += _round_up(size)
        return cls(num_ranks, capacity, hidden, top_k, count_cols, *offsets, total)


class DeviceExchange:
    """One rank's end of the device path: its window (a uint8 tensor), every rank's window address
    on this GPU (peers, int64 [W]), and an epoch per flags area (rows, back, wgrad)."""

    def __init__(
        self,
        layout: WindowLayout,
        window: torch.Tensor,
        peers: torch.Tensor,
        rank: int,
        timeout_s: float = 30.0,
    ):
        self.layout, self.window, self.peers, self.rank = layout, window, peers, rank
        self.timeout_s = timeout_s
        self.epochs = torch.zeros(3, dtype=torch.int64, device=window.device)

    def _view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.window[offset : offset + nbytes].view(dtype).view(shape)

    def check_rows(self, dtype: torch.dtype, op: str) -> None:
        check(
            dtype in (torch.bfloat16, torch.float16, FP8),
            op,
            f"the device path moves bfloat16, float16 or float8_e4m3fn rows, got {dtype}",
        )

    def _push(self, tensor: torch.Tensor, counts: torch.Tensor, area: int) -> None:
        """Region r of `tensor` (capacity layout), counts[r, 0] rows, to area `area` of rank r."""
        lay = self.layout
        rows = tensor.view(torch.uint8) if tensor.dtype == FP8 else tensor
        torch.ops.moe_kernels.ep_push_rows(
            self.peers, self.rank, lay.capacity, counts, lay.count_cols, rows, area
        )

    def _signal(self, flags: int, epoch: int, counts: torch.Tensor | None = None) -> None:
        lay = self.layout
        torch.ops.moe_kernels.ep_signal(
            self.peers, self.rank, flags, counts, lay.counts, self.epochs[epoch : epoch + 1]
        )

    def _wait(self, flags: int, epoch: int) -> None:
        flag_view = self._view(flags, torch.int64, (self.layout.num_ranks,))
        torch.ops.moe_kernels.ep_wait(flag_view, self.epochs[epoch : epoch + 1], self.timeout_s)

    def _rows_view(self, area: int, dtype: torch.dtype, width: int) -> torch.Tensor:
        lay = self.layout
        slots = lay.num_ranks * lay.capacity
        return self._view(area, torch.uint8, (slots, width * dtype.itemsize)).view(dtype)

    # -- dispatch direction (rows area) ----------------------------------------------------------
    def dispatch_send(self, plan) -> None:
        """Push this rank's staged rows (capacity layout), scales and meta, then signal with the
        counts each rank gets."""
        lay = self.layout
        self._push(plan.send_x, plan.send_counts, lay.rows)
        if plan.send_scales is not None:
            self._push(plan.send_scales, plan.send_counts, lay.scales)
        self._push(plan.meta, plan.send_counts, lay.meta)
        self._signal(lay.flags, 0, plan.send_counts)

    def dispatch_receive(self, row_dtype: torch.dtype):
        """Wait for every source, then (rows, scales or None, meta, counts) of the window."""
        lay = self.layout
        self._wait(lay.flags, 0)
        rows = self._rows_view(lay.rows, row_dtype, lay.hidden)
        scales = (
            self._rows_view(lay.scales, torch.float32, lay.hidden // QUANT_BLOCK)
            if row_dtype == FP8
            else None
        )
        meta = self._rows_view(lay.meta, torch.int32, 3 * lay.top_k).view(-1, 3, lay.top_k)
        counts = self._view(lay.counts, torch.int32, (lay.num_ranks, lay.count_cols)).clone()
        return rows, scales, meta, counts

    def rows_send(self, rows: torch.Tensor, send_counts: torch.Tensor) -> None:
        """Combine's backward: gradient rows (capacity layout) to the ranks the tokens went to."""
        self._push(rows, send_counts, self.layout.rows)
        self._signal(self.layout.flags, 0)

    def rows_receive(self, dtype: torch.dtype) -> torch.Tensor:
        self._wait(self.layout.flags, 0)
        return self._rows_view(self.layout.rows, dtype, self.layout.hidden)

    # -- combine direction (back and wgrad areas) ------------------------------------------------
    def combine_send(self, partials: torch.Tensor, recv_counts: torch.Tensor) -> None:
        """Push each source's partial sums (rows [s * C, + rows received from s)) into its window."""
        self._push(partials, recv_counts, self.layout.back)
        self._signal(self.layout.back_flags, 1)

    def combine_receive(self, dtype: torch.dtype) -> torch.Tensor:
        """Wait for every rank's partial sums: [W * C, H] rows, region r from rank r."""
        self._wait(self.layout.back_flags, 1)
        return self._rows_view(self.layout.back, dtype, self.layout.hidden)

    def wgrad_send(self, grad_weights: torch.Tensor, recv_counts: torch.Tensor) -> None:
        """Combine's backward: each source's gate-weight gradients [rows, K] fp32 back to it."""
        self._push(grad_weights, recv_counts, self.layout.wgrad)
        self._signal(self.layout.wgrad_flags, 2)

    def wgrad_receive(self) -> torch.Tensor:
        self._wait(self.layout.wgrad_flags, 2)
        return self._rows_view(self.layout.wgrad, torch.float32, self.layout.top_k)
