"""Transports: how rank-major blocks of rows move between the ranks of an expert-parallel group.

A transport moves, for each tensor of a list, rows [sum(send_counts[:p]), +send_counts[p]) to peer p,
and lands peer p's rows back to back in rank order. Counts are host integers (exact sizes).

- NcclTransport: our own NCCL communicator, one group of ncclSend/ncclRecv per call (the exact
  host path of ep-design.md §3(c)1; zero-size pairs are skipped).
- TorchTransport: torch.distributed.all_to_all_single over the group: the CPU path (gloo), and
  what a user of plain torch would write.
"""

import torch
import torch.distributed as dist

from moe_kernels._checks import FP8


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Collectives do not all take float8: FP8 rows travel as their bytes.
    return t.view(torch.uint8) if t.dtype == FP8 else t


class Transport:
    world_size: int

    def all_to_all(
        self, sends: list[torch.Tensor], send_counts: list[int], recv_counts: list[int]
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts: int32 [W, C], row p for peer p -> [W, C], row p from peer p."""
        ones = [1] * self.world_size
        return self.all_to_all([counts.contiguous()], ones, ones)[0]

    def close(self) -> None:
        pass


def _recv_like(send: torch.Tensor, rows: int) -> torch.Tensor:
    return send.new_empty((rows, *send.shape[1:]))


class NcclTransport(Transport):
    """Our own NCCL communicator over the ranks of `group` (unique id broadcast over it); every
    exchange runs on the current stream."""

    def __init__(self, group, device: torch.device):
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device
        uid = [torch.ops.moe_kernels.ep_nccl_unique_id().numpy().tobytes() if self.rank == 0 else None]
        dist.broadcast_object_list(uid, src=dist.get_global_rank(group, 0), group=group, device=device)
        unique_id = torch.frombuffer(bytearray(uid[0]), dtype=torch.uint8)
        self.comm = torch.ops.moe_kernels.ep_nccl_comm_init(
            unique_id, self.world_size, self.rank, device.index
        )

    def all_to_all(self, sends, send_counts, recv_counts):
        recvs = [_recv_like(s, sum(recv_counts)) for s in sends]
        self._exchange(sends, recvs, send_counts, recv_counts)
        return recvs

    def _exchange(self, sends, recvs, send_counts, recv_counts):
        torch.ops.moe_kernels.ep_nccl_all_to_all_v(
            self.comm,
            [_as_bytes(s.contiguous()) for s in sends],
            [_as_bytes(r) for r in recvs],
            send_counts,
            recv_counts,
        )

    def close(self) -> None:
        if self.comm is not None:
            torch.cuda.synchronize(self.device)
            torch.ops.moe_kernels.ep_nccl_comm_destroy(self.comm)
            self.comm = None


class TorchTransport(Transport):
    """torch.distributed.all_to_all_single over `group`, one call per tensor."""

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)

    def all_to_all(self, sends, send_counts, recv_counts):
        recvs = []
        rows = sum(send_counts)  # all_to_all_single wants exactly the rows it sends
        for s in sends:
            r = _recv_like(s, sum(recv_counts))
            dist.all_to_all_single(
                _as_bytes(r),
                _as_bytes(s[:rows].contiguous()),
                list(recv_counts),
                list(send_counts),
                group=self.group,
            )
            recvs.append(r)
        return recvs
