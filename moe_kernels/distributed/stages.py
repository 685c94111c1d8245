"""The local steps of dispatch and combine, on either side of the exchange (ep-design.md §3).

ExpertParallel runs them around a real transport; the loopback runs them for W virtual ranks in one
process. Both run exactly these functions, so a test of the loopback tests the kernels of the real
path.

    source: token ranks -> permute's index over the ranks (each token's slot per rank) and over the
            experts (eidx) -> meta and counts -> pack (each token read once, FP8-quantised in the
            same pass if asked, written once per destination rank)
    [exchange of counts, then of rows + scales + meta]
    receiver: unpack into the expert-major layout of permute
    ... experts ...
    receiver: each received token's rows summed with its gate weights (unpermute) -> one row back
    [exchange back, sizes reversed]
    source: the partial sums added in rank order, plus the shared output (unpermute)
"""

from dataclasses import dataclass

import torch

from moe_kernels.distributed import _ops
from moe_kernels.distributed.expert_map import ExpertMap

# The ops are called without their front doors' pending-error check: dispatch and combine check
# once, at the start, so an error found by one step is not raised half-way through the next.
_permute = torch.ops.moe_kernels.permute
_unpermute = torch.ops.moe_kernels.unpermute


@dataclass
class SendPlan:
    """A source's half of a dispatch: what it sends and what it needs to combine later."""

    send_x: torch.Tensor  # [S, H] rows, rank-major, x's dtype or e4m3
    send_scales: torch.Tensor | None  # [S, H/128] fp32 when FP8
    meta: torch.Tensor  # int32 [S, 3, K]
    send_counts: torch.Tensor  # int32 [W, 1 + L] on the device
    rank_ids: torch.Tensor  # int32 [T, K] destination ranks per token, ascending, -1 padded
    send_row_map: torch.Tensor  # int32 [T, K] the send row of (token, rank_ids[t, j]), -1 none
    pair_slot: torch.Tensor  # int32 [T, K] send_row * K + meta entry of each pair, -1 dropped


def plan_send(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor | None,
    expert_map: ExpertMap,
    *,
    quantize: bool = False,
    pow2_scale: bool = False,
    x_scales: torch.Tensor | None = None,
    capacity: int = 0,
) -> SendPlan:
    """capacity 0: rank r's rows packed after rank r-1's (exact sizes, S = T * min(K, W) rows);
    capacity C: at [r * C, r * C + count) (fixed sizes, S = W * C; C >= T never overflows)."""
    t, k = expert_ids.shape
    w, e = expert_map.num_ranks, expert_map.num_experts
    rank_ids = _ops.token_ranks(expert_ids, expert_map.expert_rank, w)
    # Zero columns: only permute's index. Over the rank ids: each token's slot per rank, in token
    # order; over the expert ids: each pair's index among this source's pairs of its expert.
    index_only = x.new_empty((t, 0), dtype=torch.bfloat16)
    _, _, rank_offsets, packed_rows = _permute(index_only, None, rank_ids, w, 0, w, 1, False, False, t * k)
    _, _, expert_offsets, expert_row_map = _permute(
        index_only, None, expert_ids, e, 0, e, 1, False, False, t * k
    )
    # A token goes to at most min(K, W) ranks: the packed block's bound, exact when none is dropped.
    num_send_rows = w * capacity if capacity else t * min(k, w)
    meta, pair_slot, send_counts, send_row_map = _ops.pack_meta(
        expert_ids,
        weights,
        expert_map.expert_rank,
        expert_map.expert_local,
        expert_row_map,
        expert_offsets,
        rank_ids,
        packed_rows,
        rank_offsets,
        expert_map.rank_experts,
        capacity,
        num_send_rows,
    )
    send_x, send_scales = _ops.pack_rows(x, x_scales, send_row_map, quantize, pow2_scale, num_send_rows)
    return SendPlan(send_x, send_scales, meta, send_counts, rank_ids, send_row_map, pair_slot)


def padded_rows(recv_counts_host: torch.Tensor, num_local: int, align: int) -> int:
    """Rows the unpacked output needs: each local expert's received pairs padded to `align`."""
    per_expert = recv_counts_host[:, 1 : 1 + num_local].long().sum(0)
    return int(((per_expert + align - 1) // align * align).sum())


def rows_bound(num_sources: int, max_tokens: int, top_k: int, num_local: int, align: int) -> int:
    """Rows the unpacked output needs at most: every source's tokens to min(K, L) local experts."""
    return num_sources * max_tokens * min(top_k, num_local) + num_local * (align - 1)


def expert_partials(
    y: torch.Tensor, recv_row_map: torch.Tensor, recv_weights: torch.Tensor | None
) -> torch.Tensor:
    """Receiver side of combine: one row per received token, the sum of its rows here weighted by
    its gate weights (fp32, k order, rounded once to y's dtype)."""
    return _unpermute(y, recv_row_map, recv_weights, None)


def source_sum(
    back: torch.Tensor, send_row_map: torch.Tensor, shared_output: torch.Tensor | None
) -> torch.Tensor:
    """Source side of combine: per token, the partial sums of its ranks in rank order (fp32),
    plus the shared output, rounded once."""
    return _unpermute(back, send_row_map, None, shared_output)


def gather_send_rows(rows: torch.Tensor, send_row_map: torch.Tensor, num_send_rows: int) -> torch.Tensor:
    """Each token's row once per destination rank, in the send block's layout (combine's backward)."""
    return _ops.pack_rows(rows, None, send_row_map, False, False, num_send_rows)[0]
