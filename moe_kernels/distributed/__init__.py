"""Expert parallelism: tokens to the ranks that hold their experts and back (ep-design.md §3).

    ExpertParallel(group, num_experts, hidden_size, max_tokens_per_rank=..., top_k=...)
        .dispatch(x, expert_ids, weights) -> (rows, row_scales, expert_offsets, handle)
        .combine(y, handle, shared_output=None) -> [T, H]
    all_reduce_counts: per-expert counts summed over a group (for the expert-bias update)
    loopback: W virtual ranks in one process, running the same local steps (tests, benchmarks)

Import rule: distributed imports ops (never layers or integrations).
"""

import torch

from moe_kernels._checks import check_dtype
from moe_kernels.distributed.expert_map import ExpertMap
from moe_kernels.distributed.expert_parallel import DispatchResult, EPHandle, ExpertParallel


def all_reduce_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sum per-expert int counts over a torch.distributed process group, in place (exact: integer
    all-reduce; never cast counts to bf16 — rounding flips the sign of mean - count)."""
    check_dtype(counts, (torch.int32, torch.int64), "all_reduce_counts", "counts")
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
    return counts


__all__ = ["DispatchResult", "EPHandle", "ExpertMap", "ExpertParallel", "all_reduce_counts"]
