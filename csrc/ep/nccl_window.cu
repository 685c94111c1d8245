// Symmetric NCCL windows for the expert-parallel device path: ncclMemAlloc memory registered on
// our communicator with a device communicator (created first: without one, registration returns a
// local handle whose LSA pointers crash), and the LSA address of every rank's window, read on the
// device (NCCL 2.28 has no host getter). Held in a registry by id, like the communicators.
//
// The device API's ABI changed between NCCL 2.28 and 2.30 (ep-design.md §0): this file must be
// compiled against the NCCL it runs with, which creation checks.
#include <nccl.h>
#include <nccl_device.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "ep/nccl_comm.h"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

struct Window {
  int64_t comm_id = -1;
  void* ptr = nullptr;
  int64_t bytes = 0;
  ncclWindow_t window{};
  ncclDevComm dev_comm{};
  at::Tensor peers;  // int64 [W] on the device
};

std::mutex g_windows_mutex;
std::vector<std::unique_ptr<Window>> g_windows;  // index = id; destroyed entries are null

Window& lookup_window(int64_t id, const char* op) {
  const std::lock_guard<std::mutex> lock(g_windows_mutex);
  MK_CHECK(id >= 0 && id < static_cast<int64_t>(g_windows.size()) && g_windows[id] != nullptr, op,
           "no live window with id ", id, " (was it closed?)");
  return *g_windows[id];
}

__global__ void lsa_peers_kernel(ncclWindow_t window, int num_ranks, int64_t* peers) {
  const int r = threadIdx.x;
  if (r < num_ranks) {
    peers[r] = reinterpret_cast<int64_t>(ncclGetLsaPointer(window, 0, r));
  }
}

void check_runtime_version(const char* op) {
  int runtime = 0;
  MK_NCCL_CHECK(ncclGetVersion(&runtime), op);
  TORCH_CHECK(
      runtime == NCCL_VERSION_CODE, op, ": the NCCL device API was compiled against NCCL ", NCCL_VERSION_CODE,
      " but NCCL ", runtime,
      " is loaded; its ABI differs between versions, so rebuild moe_kernels where it runs (or use the host "
      "transport)");
}

}  // namespace

int64_t ep_nccl_window_create(int64_t comm_id, int64_t bytes) {
  constexpr const char* op = "ep_nccl_window_create";
  check_runtime_version(op);
  MK_CHECK(bytes > 0, op, "bytes must be > 0, got ", bytes);
  Communicator& c = ep_nccl_communicator(comm_id, op);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c.device));
  auto w = std::make_unique<Window>();
  w->comm_id = comm_id;
  w->bytes = bytes;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 0)
  ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  ncclDevCommRequirements reqs;
  std::memset(&reqs, 0, sizeof(reqs));
#endif
  MK_NCCL_CHECK(ncclDevCommCreate(c.comm, &reqs, &w->dev_comm), op);
  MK_CHECK(w->dev_comm.lsaSize == c.world_size, op,
           "the device path needs every rank to reach every other over NVLink (", "one node); ",
           w->dev_comm.lsaSize, " of ", c.world_size, " ranks are reachable: use the host transport");
  MK_NCCL_CHECK(ncclMemAlloc(&w->ptr, static_cast<size_t>(bytes)), op);
  MK_CUDA_CHECK(cudaMemset(w->ptr, 0, static_cast<size_t>(bytes)), op);  // flags start at 0
  MK_NCCL_CHECK(
      ncclCommWindowRegister(c.comm, w->ptr, static_cast<size_t>(bytes), &w->window, NCCL_WIN_COLL_SYMMETRIC),
      op);
  w->peers = at::empty({c.world_size}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, c.device));
  lsa_peers_kernel<<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(w->window, c.world_size,
                                                                     w->peers.data_ptr<int64_t>());
  MK_CUDA_CHECK(cudaGetLastError(), op);
  MK_CUDA_CHECK(cudaDeviceSynchronize(), op);
  const std::lock_guard<std::mutex> lock(g_windows_mutex);
  g_windows.push_back(std::move(w));
  return static_cast<int64_t>(g_windows.size()) - 1;
}

at::Tensor ep_nccl_window_tensor(int64_t id) {
  Window& w = lookup_window(id, "ep_nccl_window_tensor");
  const int device = w.peers.get_device();
  // Aliases the window; the registry entry owns the memory (free it with ep_nccl_window_destroy).
  return at::from_blob(w.ptr, {w.bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
}

at::Tensor ep_nccl_window_peers(int64_t id) {
  return lookup_window(id, "ep_nccl_window_peers").peers;
}

void ep_nccl_window_destroy(int64_t id) {
  constexpr const char* op = "ep_nccl_window_destroy";
  std::unique_ptr<Window> w;
  {
    const std::lock_guard<std::mutex> lock(g_windows_mutex);
    MK_CHECK(id >= 0 && id < static_cast<int64_t>(g_windows.size()) && g_windows[id] != nullptr, op,
             "no live window with id ", id);
    w = std::move(g_windows[id]);
  }
  Communicator& c = ep_nccl_communicator(w->comm_id, op);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c.device));
  MK_CUDA_CHECK(cudaDeviceSynchronize(), op);
  MK_NCCL_CHECK(ncclCommWindowDeregister(c.comm, w->window), op);
  MK_NCCL_CHECK(ncclDevCommDestroy(c.comm, &w->dev_comm), op);
  MK_NCCL_CHECK(ncclMemFree(w->ptr), op);
}

}  // namespace moe_kernels
