// NCCL communicators of moe_kernels.distributed.ExpertParallel, held in a registry by integer id
// (a schema cannot hold an ncclComm_t), and the exact all-to-all-v of its host transport.
#pragma once

#include <ATen/ATen.h>
#include <nccl.h>

#include <vector>

// Every NCCL status is checked and reported by name.
#define MK_NCCL_CHECK(expr, op)                                                                 \
  do {                                                                                          \
    const ncclResult_t mk_status_ = (expr);                                                     \
    TORCH_CHECK(mk_status_ == ncclSuccess, op, ": NCCL error ", ncclGetErrorString(mk_status_), \
                " in " #expr " (", ncclGetLastError(nullptr), ")");                             \
  } while (0)

namespace moe_kernels {

struct Communicator {
  ncclComm_t comm = nullptr;
  int device = -1;
  int world_size = 0;
  int rank = -1;
};

// The live communicator with this id (ValueError naming `op` if there is none).
Communicator& ep_nccl_communicator(int64_t id, const char* op);

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

// Symmetric windows of the device path (csrc/ep/nccl_window.cu): `bytes` of ncclMemAlloc memory,
// zeroed and registered on the communicator (collective: every rank, same order); the local
// window as a uint8 tensor; every rank's window address on this GPU (int64 [W]).
int64_t ep_nccl_window_create(int64_t comm, int64_t bytes);
at::Tensor ep_nccl_window_tensor(int64_t window);
at::Tensor ep_nccl_window_peers(int64_t window);
void ep_nccl_window_destroy(int64_t window);

}  // namespace moe_kernels
