"""Which rank holds which expert: the tables the expert-parallel kernels read, built once."""

from dataclasses import dataclass

import torch

from moe_kernels._checks import check


@dataclass(frozen=True)
class ExpertMap:
    """Experts over ranks. Rank r's experts, in ascending global id, are its local experts 0..L_r-1.

    expert_rank: int32 [E], the rank of each expert; expert_local: int32 [E], its local index;
    rank_experts: int32 [W, L] (L = the most experts any rank holds), each rank's experts, -1 padded.
    """

    num_ranks: int
    expert_rank: torch.Tensor
    expert_local: torch.Tensor
    rank_experts: torch.Tensor
    local_counts: tuple[int, ...]

    @classmethod
    def build(cls, num_experts: int, num_ranks: int, expert_to_rank=None, device=None) -> "ExpertMap":
        """expert_to_rank: None (E split evenly and contiguously; E must divide by W) or a sequence of
        E ranks in [0, W), each rank holding at least one expert."""
        op = "ExpertParallel"
        check(num_ranks >= 1, op, f"world size must be >= 1, got {num_ranks}")
        if expert_to_rank is None:
            check(
                num_experts % num_ranks == 0,
                op,
                f"num_experts={num_experts} must divide by the world size {num_ranks} "
                "(or pass expert_to_rank)",
            )
            ranks = torch.arange(num_experts) // (num_experts // num_ranks)
        else:
            ranks = torch.as_tensor(list(expert_to_rank), dtype=torch.int64)
            check(
                ranks.numel() == num_experts,
                op,
                f"expert_to_rank must name a rank for each of the {num_experts} experts, got {ranks.numel()}",
            )
            check(
                bool(((ranks >= 0) & (ranks < num_ranks)).all()),
                op,
                f"expert_to_rank values must be in [0, {num_ranks})",
            )
        counts = torch.bincount(ranks, minlength=num_ranks)
        check(
            bool((counts >= 1).all()),
            op,
            f"every rank must hold at least one expert, got counts {counts.tolist()}",
        )
        local = torch.empty_like(ranks)
        width = int(counts.max())
        rank_experts = torch.full((num_ranks, width), -1, dtype=torch.int64)
        for r in range(num_ranks):
            mine = (ranks == r).nonzero().flatten()
            local[mine] = torch.arange(len(mine))
            rank_experts[r, : len(mine)] = mine
        return cls(
            num_ranks,
            ranks.to(torch.int32).to(device),
            local.to(torch.int32).to(device),
            rank_experts.to(torch.int32).to(device),
            tuple(counts.tolist()),
        )

    @property
    def num_experts(self) -> int:
        return self.expert_rank.numel()

    def experts_of(self, rank: int) -> list[int]:
        """Rank's experts, ascending global ids."""
        return self.rank_experts[rank, : self.local_counts[rank]].tolist()

    def as_list(self) -> list[int]:
        return self.expert_rank.tolist()
