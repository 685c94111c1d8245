"""Loopback: W virtual expert-parallel ranks in one process on one device, for tests and benchmarks.

It runs the same local steps as ExpertParallel (moe_kernels.distributed.stages) for every virtual
rank; only the exchange differs: a device copy of each (source, destination) block, sized from the
counts read on the host. So everything but the wire is tested on one GPU (NCCL refuses two ranks
on one GPU).
"""

import torch

from moe_kernels._checks import check
from moe_kernels.distributed import _ops, stages
from moe_kernels.distributed.device_path import DeviceExchange, WindowLayout
from moe_kernels.distributed.expert_map import ExpertMap
from moe_kernels.distributed.expert_parallel import EPHandle


def _exchange(
    blocks: list[list[torch.Tensor]], regions: torch.Tensor, counts: torch.Tensor | None = None
) -> list[list[torch.Tensor]]:
    """blocks[s][i]: source s's rank-major tensor i; regions[s][d]: rows of the (s, d) region, in the
    send block and in d's receive block (host). Returns recv[d][i]: d's regions in source order.
    counts[s][d] (host, default: the whole region): the rows of the region actually copied. NCCL
    copies whole regions, but with fixed sizes the rows past the count were never written by the
    pack and the receiver must not read them: leaving them unwritten here lets initcheck prove it."""
    w = regions.shape[0]
    counts = regions if counts is None else counts
    starts = torch.cat([torch.zeros(w, 1, dtype=regions.dtype), regions.cumsum(1)], 1)
    out = []
    for d in range(w):
        received = []
        for i in range(len(blocks[0])):
            recv = blocks[0][i].new_empty(int(regions[:, d].sum()), *blocks[0][i].shape[1:])
            at = 0
            for s in range(w):
                start, n = int(starts[s, d]), min(int(counts[s, d]), int(regions[s, d]))
                recv[at : at + n] = blocks[s][i][start : start + n]
                at += int(regions[s, d])
            received.append(recv)
        out.append(received)
    return out


def dispatch(
    xs: list[torch.Tensor],
    expert_ids: list[torch.Tensor],
    weights: list[torch.Tensor] | None,
    expert_map: ExpertMap,
    *,
    quantize: bool = False,
    pow2_scale: bool = False,
    x_scales: list[torch.Tensor] | None = None,
    align: int = 1,
    capacity: int = 0,
    device_path: bool = False,
):
    """ExpertParallel.dispatch for every virtual rank at once: a list of (out, out_scales,
    expert_offsets, handle), one per rank. capacity 0: exact sizes; C: fixed regions of C rows
    (dispatch(exact=False) with max_tokens_per_rank = C), output rows the bound.

    device_path: the device path's kernels (push into windows, signal, wait) over W windows of one
    allocation, with the same capacity: every virtual rank's send runs before any receive, so no
    wait can spin on a signal that comes later."""
    w = expert_map.num_ranks
    if device_path:
        return _dispatch_device(
            xs, expert_ids, weights, expert_map, quantize, pow2_scale, x_scales, align, capacity
        )
    plans = _plans(xs, expert_ids, weights, expert_map, quantize, pow2_scale, x_scales, capacity)
    send_counts = torch.stack([p.send_counts for p in plans])  # [src, dst, 1 + L]
    recv_counts = send_counts.transpose(0, 1).contiguous()  # [dst, src, 1 + L]
    rows = send_counts[:, :, 0].cpu() if not capacity else torch.full((w, w), capacity)
    counted = None  # whole regions: with fixed sizes under graph capture, the counts are unknown
    capturing = send_counts.is_cuda and torch.cuda.is_current_stream_capturing()
    if capacity and not capturing:
        counted = send_counts[:, :, 0].cpu()
    fp8 = plans[0].send_scales is not None
    blocks = [
        [p.send_x.view(torch.uint8) if fp8 else p.send_x, p.meta] + ([p.send_scales] if fp8 else [])
        for p in plans
    ]
    received = _exchange(blocks, rows, counted)
    results = []
    for d in range(w):
        recv_x = received[d][0].view(plans[0].send_x.dtype) if fp8 else received[d][0]
        num_local = expert_map.local_counts[d]
        if capacity:
            rows_out = stages.rows_bound(w, capacity, expert_ids[d].shape[1], num_local, align)
        else:
            rows_out = stages.padded_rows(recv_counts[d].cpu(), num_local, align)
        unpacked = _ops.unpack(
            recv_x,
            received[d][2] if fp8 else None,
            received[d][1],
            recv_counts[d],
            num_local,
            capacity,
            align,
            rows_out,
        )
        handle = EPHandle.of(
            plans[d],
            xs[d].shape[0],
            rows_out,
            unpacked,
            rows[d].tolist(),
            rows[:, d].tolist(),
            None if weights is None else weights[d],
        )
        results.append((*unpacked[:3], handle))
    return results


def combine(
    ys: list[torch.Tensor], handles: list[EPHandle], shared_outputs: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """ExpertParallel.combine for every virtual rank at once."""
    w = len(ys)
    partials = [
        [stages.expert_partials(ys[r], h.recv_row_map, h.recv_weights)] for r, h in enumerate(handles)
    ]
    if handles[0].device_exchange is not None:
        for (p,), h in zip(partials, handles, strict=True):
            h.device_exchange.combine_send(p, h.recv_counts_dev)
        return [
            stages.source_sum(
                handles[s].device_exchange.combine_receive(ys[s].dtype),
                handles[s].send_row_map,
                None if shared_outputs is None else shared_outputs[s],
            )
            for s in range(w)
        ]
    # Back: receiver d returns to source s the rows s sent it.
    back_counts = torch.tensor([h.recv_counts for h in handles])  # [d, s]
    back = _exchange(partials, back_counts)
    return [
        stages.source_sum(
            back[s][0], handles[s].send_row_map, None if shared_outputs is None else shared_outputs[s]
        )
        for s in range(w)
    ]


def windows(expert_map: ExpertMap, capacity: int, hidden: int, top_k: int, device) -> list[DeviceExchange]:
    """W virtual ranks' ends of the device path: W windows in one zeroed allocation."""
    w = expert_map.num_ranks
    layout = WindowLayout.build(w, capacity, hidden, top_k, expert_map.rank_experts.shape[1] + 1)
    memory = torch.zeros(w * layout.bytes, dtype=torch.uint8, device=device)
    peers = memory.data_ptr() + torch.arange(w, dtype=torch.int64, device=device) * layout.bytes
    return [
        DeviceExchange(layout, memory[r * layout.bytes : (r + 1) * layout.bytes], peers, r) for r in range(w)
    ]


def _dispatch_device(xs, expert_ids, weights, expert_map, quantize, pow2_scale, x_scales, align, capacity):
    check(capacity > 0, "loopback.dispatch", "the device path needs a capacity (rows per source region)")
    w = expert_map.num_ranks
    exchanges = windows(expert_map, capacity, xs[0].shape[1], expert_ids[0].shape[1], xs[0].device)
    plans = _plans(xs, expert_ids, weights, expert_map, quantize, pow2_scale, x_scales, capacity)
    for plan, exchange in zip(plans, exchanges, strict=True):
        exchange.dispatch_send(plan)
    results = []
    for d in range(w):
        rows, scales, meta, recv_counts = exchanges[d].dispatch_receive(plans[d].send_x.dtype)
        num_local = expert_map.local_counts[d]
        rows_out = stages.rows_bound(w, capacity, expert_ids[d].shape[1], num_local, align)
        unpacked = _ops.unpack(rows, scales, meta, recv_counts, num_local, capacity, align, rows_out)
        handle = EPHandle.of(
            plans[d],
            xs[d].shape[0],
            rows_out,
            unpacked,
            [capacity] * w,
            [capacity] * w,
            None if weights is None else weights[d],
            device_exchange=exchanges[d],
            recv_counts_dev=recv_counts,
        )
        results.append((*unpacked[:3], handle))
    return results


def _plans(xs, expert_ids, weights, expert_map, quantize, pow2_scale, x_scales, capacity):
    """Every virtual rank's source side."""
    return [
        stages.plan_send(
            xs[r],
            expert_ids[r],
            None if weights is None else weights[r],
            expert_map,
            quantize=quantize,
            pow2_scale=pow2_scale,
            x_scales=None if x_scales is None else x_scales[r],
            capacity=capacity,
        )
        for r in range(len(xs))
    ]
