// NCCL communicators of moe_kernels.distributed.ExpertParallel, held in a registry by integer id
// (a schema cannot hold an ncclComm_t), and the exact all-to-all-v of its host transport.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace moe_kernels {

// 128 bytes of ncclUniqueId in a CPU uint8 tensor, to broadcast over the torch process group.
at::Tensor ep_nccl_unique_id();
// ncclCommInitRankConfig (blocking) on `device`; returns the registry id.
int64_t ep_nccl_comm_init(const at::Tensor& unique_id, int64_t world_size, int64_t rank, int64_t device);
void ep_nccl_comm_destroy(int64_t id);
// For each (send, recv) tensor pair: rows [sum(send_counts[..p]) ...) go to peer p, rows from peer p
// land back to back in rank order; one NCCL group on the current stream, zero-size pairs skipped.
void ep_nccl_all_to_all_v(int64_t id, const std::vector<at::Tensor>& sends,
                          const std::vector<at::Tensor>& recvs, c10::IntArrayRef send_counts,
                          c10::IntArrayRef recv_counts);

}  // namespace moe_kernels
