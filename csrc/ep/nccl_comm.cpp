// NCCL communicators owned by moe_kernels.distributed.ExpertParallel, and the exact all-to-all-v
// of its host transport: one ncclGroupStart/End of ncclSend/ncclRecv per peer, with host counts.
// A schema cannot hold an ncclComm_t, so the ops take an integer id into this registry; the
// Python object that created a communicator destroys it.
#include <nccl.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "ep/nccl_comm.h"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

std::mutex g_registry_mutex;
std::vector<std::unique_ptr<Communicator>> g_registry;  // index = id; destroyed entries are null

}  // namespace

Communicator& ep_nccl_communicator(int64_t id, const char* op) {
  const std::lock_guard<std::mutex> lock(g_registry_mutex);
  MK_CHECK(id >= 0 && id < static_cast<int64_t>(g_registry.size()) && g_registry[id] != nullptr, op,
           "no live communicator with id ", id, " (was it closed?)");
  return *g_registry[id];
}

at::Tensor ep_nccl_unique_id() {
  ncclUniqueId id;
  MK_NCCL_CHECK(ncclGetUniqueId(&id), "ep_nccl_unique_id");
  at::Tensor out = at::empty({static_cast<int64_t>(sizeof(id))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr(), &id, sizeof(id));
  return out;
}

int64_t ep_nccl_comm_init(const at::Tensor& unique_id, int64_t world_size, int64_t rank, int64_t device) {
  constexpr const char* op = "ep_nccl_comm_init";
  MK_CHECK(unique_id.device().is_cpu() && unique_id.scalar_type() == at::kByte &&
               unique_id.numel() == static_cast<int64_t>(sizeof(ncclUniqueId)),
           op, "unique_id must be a CPU uint8 tensor of ", sizeof(ncclUniqueId), " bytes, got ",
           dtype_name(unique_id.scalar_type()), " ", shape_str(unique_id), " on ", unique_id.device());
  MK_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, op,
           "rank must be in [0, world_size=", world_size, "), got ", rank);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.contiguous().data_ptr(), sizeof(id));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 1;
  config.commName = "moe_kernels_ep";
  auto entry = std::make_unique<Communicator>();
  MK_NCCL_CHECK(
      ncclCommInitRankConfig(&entry->comm, static_cast<int>(world_size), id, static_cast<int>(rank), &config),
      op);
  entry->device = static_cast<int>(device);
  entry->world_size = static_cast<int>(world_size);
  entry->rank = static_cast<int>(rank);
  const std::lock_guard<std::mutex> lock(g_registry_mutex);
  g_registry.push_back(std::move(entry));
  return static_cast<int64_t>(g_registry.size()) - 1;
}

void ep_nccl_comm_destroy(int64_t id) {
  std::unique_ptr<Communicator> entry;
  {
    const std::lock_guard<std::mutex> lock(g_registry_mutex);
    MK_CHECK(id >= 0 && id < static_cast<int64_t>(g_registry.size()) && g_registry[id] != nullptr,
             "ep_nccl_comm_destroy", "no live communicator with id ", id);
    entry = std::move(g_registry[id]);
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(entry->device));
  MK_NCCL_CHECK(ncclCommDestroy(entry->comm), "ep_nccl_comm_destroy");
}

namespace {

// Bytes of one row (the first dimension) of a contiguous tensor.
int64_t row_bytes(const at::Tensor& t) {
  int64_t elems = 1;
  for (int64_t d = 1; d < t.dim(); ++d) {
    elems *= t.size(d);
  }
  return elems * t.element_size();
}

}  // namespace

void ep_nccl_all_to_all_v(int64_t id, const std::vector<at::Tensor>& sends,
                          const std::vector<at::Tensor>& recvs, c10::IntArrayRef send_counts,
                          c10::IntArrayRef recv_counts) {
  constexpr const char* op = "ep_nccl_all_to_all_v";
  Communicator& c = ep_nccl_communicator(id, op);
  MK_CHECK(sends.size() == recvs.size(), op, "sends and recvs must pair up, got ", sends.size(), " and ",
           recvs.size(), " tensors");
  MK_CHECK(static_cast<int>(send_counts.size()) == c.world_size &&
               static_cast<int>(recv_counts.size()) == c.world_size,
           op, "send_counts and recv_counts must have world_size=", c.world_size, " entries, got ",
           send_counts.size(), " and ", recv_counts.size());
  int64_t send_total = 0, recv_total = 0;
  for (int p = 0; p < c.world_size; ++p) {
    MK_CHECK(send_counts[p] >= 0 && recv_counts[p] >= 0, op, "counts must be >= 0");
    send_total += send_counts[p];
    recv_total += recv_counts[p];
  }
  for (size_t i = 0; i < sends.size(); ++i) {
    const at::Tensor& s = sends[i];
    const at::Tensor& r = recvs[i];
    MK_CHECK(s.is_cuda() && r.is_cuda() && s.get_device() == c.device && r.get_device() == c.device, op,
             "tensor ", i, " must be on cuda:", c.device, " (the communicator's device), got ", s.device(),
             " and ", r.device());
    MK_CHECK(s.is_contiguous() && r.is_contiguous() && s.dim() >= 1 && r.dim() >= 1 &&
                 row_bytes(s) == row_bytes(r),
             op, "tensor ", i, ": sends and recvs must be contiguous with rows of equal bytes, got ",
             shape_str(s), " and ", shape_str(r));
    MK_CHECK(s.size(0) >= send_total && r.size(0) >= recv_total, op, "tensor ", i, ": ", s.size(0),
             " send rows and ", r.size(0), " receive rows cannot hold the counts' ", send_total, " and ",
             recv_total);
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c.device));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_NCCL_CHECK(ncclGroupStart(), op);
  for (size_t i = 0; i < sends.size(); ++i) {
    const int64_t bytes = row_bytes(sends[i]);
    auto* send = static_cast<const char*>(sends[i].data_ptr());
    auto* recv = static_cast<char*>(recvs[i].data_ptr());
    int64_t send_row = 0, recv_row = 0;
    for (int p = 0; p < c.world_size; ++p) {
      if (send_counts[p] > 0) {
        MK_NCCL_CHECK(ncclSend(send + send_row * bytes, send_counts[p] * bytes, ncclUint8, p, c.comm, stream),
                      op);
      }
      if (recv_counts[p] > 0) {
        MK_NCCL_CHECK(ncclRecv(recv + recv_row * bytes, recv_counts[p] * bytes, ncclUint8, p, c.comm, stream),
                      op);
      }
      send_row += send_counts[p];
      recv_row += recv_counts[p];
    }
  }
  MK_NCCL_CHECK(ncclGroupEnd(), op);
}

}  // namespace moe_kernels
