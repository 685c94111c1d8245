// Launchers of the expert-parallel device path (csrc/include/moe_kernels/ep_device.cuh): push rows
// into the peers' windows, signal them, wait for their signals. Peers are given as an int64 tensor
// of window addresses (NCCL LSA pointers, or the loopback's W windows of one allocation).
#include "common/device_error.h"
#include "moe_kernels/ep_device.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

void check_peers(const at::Tensor& peers, const char* op) {
  MK_CHECK_CUDA_TENSOR(peers, op, "peers");
  MK_CHECK(peers.scalar_type() == at::kLong && peers.dim() == 1 && peers.size(0) >= 1 &&
               peers.size(0) <= 1024 && peers.is_contiguous(),
           op, "peers must be a contiguous int64 [W] tensor with 1 <= W <= 1024, got ",
           dtype_name(peers.scalar_type()), " ", shape_str(peers));
}

void check_region(int64_t region, int64_t num_ranks, const char* op) {
  MK_CHECK(region >= 0 && region < num_ranks, op, "region (this rank) must be in [0, ", num_ranks, "), got ",
           region);
}

void ep_push_rows(const at::Tensor& peers, int64_t region, int64_t capacity, const at::Tensor& counts,
                  int64_t count_stride, const at::Tensor& src, int64_t dst_offset) {
  constexpr const char* op = "ep_push_rows";
  check_peers(peers, op);
  const int64_t w = peers.size(0);
  check_region(region, w, op);
  MK_CHECK_SAME_DEVICE(peers, counts, op, "peers", "counts");
  MK_CHECK_SAME_DEVICE(peers, src, op, "peers", "src");
  MK_CHECK(counts.scalar_type() == at::kInt && counts.is_contiguous() &&
               counts.numel() >= (w - 1) * count_stride + 1,
           op, "counts must be contiguous int32 holding W rows of stride ", count_stride, ", got ",
           shape_str(counts));
  MK_CHECK(capacity >= 1 && src.is_contiguous() && src.dim() >= 1 && src.size(0) == w * capacity, op,
           "src must be contiguous [W * capacity, ...] = [", w * capacity, ", ...], got ", shape_str(src));
  const int64_t row_bytes = src.numel() / src.size(0) * src.element_size();
  MK_CHECK(row_bytes % 4 == 0 && dst_offset % 16 == 0, op,
           "rows must be whole 4-byte words and dst_offset 16-byte "
           "aligned, got ",
           row_bytes, " and ", dst_offset);
  check_hopper(src, op);
  const c10::cuda::CUDAGuard guard(src.device());
  if (row_bytes == 0) {
    return;
  }
  ep::PushParams p{};
  p.peers = peers.data_ptr<int64_t>();
  p.num_ranks = static_cast<int>(w);
  p.region = static_cast<int>(region);
  p.capacity = static_cast<int>(capacity);
  p.counts = counts.data_ptr<int>();
  p.count_stride = static_cast<int>(count_stride);
  p.src = src.data_ptr();
  p.dst_offset = dst_offset;
  // Enough blocks per destination to fill the GPU when every destination gets its full region.
  const int64_t vec_bytes = row_bytes % 16 == 0 ? 16 : 4;
  p.row_words = row_bytes / vec_bytes;
  const int64_t most_words = capacity * p.row_words;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_rank = std::max<int64_t>(
      1, std::min<int64_t>((2 * sms + w - 1) / w, (most_words + ep::kPushThreads - 1) / ep::kPushThreads));
  const dim3 grid(static_cast<unsigned>(per_rank), static_cast<unsigned>(w));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vec_bytes == 16) {
    ep::push_rows_kernel<uint4><<<grid, ep::kPushThreads, 0, stream>>>(p);
  } else {
    ep::push_rows_kernel<uint32_t><<<grid, ep::kPushThreads, 0, stream>>>(p);
  }
  MK_CUDA_CHECK(cudaGetLastError(), op);
}

void ep_signal(const at::Tensor& peers, int64_t region, int64_t flags_offset,
               const std::optional<at::Tensor>& counts, int64_t counts_offset, const at::Tensor& epoch) {
  constexpr const char* op = "ep_signal";
  check_peers(peers, op);
  const int64_t w = peers.size(0);
  check_region(region, w, op);
  MK_CHECK(epoch.is_cuda() && epoch.scalar_type() == at::kLong && epoch.numel() == 1, op,
           "epoch must be a CUDA int64 tensor of one element");
  MK_CHECK(flags_offset % 8 == 0 && counts_offset % 4 == 0, op, "flags_offset must be 8-byte aligned, got ",
           flags_offset);
  int cols = 0;
  const int* counts_ptr = nullptr;
  if (counts.has_value()) {
    MK_CHECK(counts->scalar_type() == at::kInt && counts->dim() == 2 && counts->size(0) == w &&
                 counts->is_contiguous(),
             op, "counts must be contiguous int32 [W, columns], got ", shape_str(*counts));
    cols = static_cast<int>(counts->size(1));
    counts_ptr = counts->data_ptr<int>();
  }
  const c10::cuda::CUDAGuard guard(peers.device());
  ep::signal_kernel<<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(
      peers.data_ptr<int64_t>(), static_cast<int>(w), static_cast<int>(region), flags_offset, counts_ptr,
      cols, counts_offset, epoch.data_ptr<int64_t>());
  MK_CUDA_CHECK(cudaGetLastError(), op);
}

void ep_wait(const at::Tensor& flags, const at::Tensor& epoch, double timeout_s) {
  constexpr const char* op = "ep_wait";
  MK_CHECK(flags.is_cuda() && flags.scalar_type() == at::kLong && flags.dim() == 1 && flags.size(0) >= 1 &&
               flags.size(0) <= 1024 && flags.is_contiguous(),
           op, "flags must be a contiguous CUDA int64 [W] tensor, got ", shape_str(flags));
  MK_CHECK(epoch.is_cuda() && epoch.scalar_type() == at::kLong && epoch.numel() == 1, op,
           "epoch must be a CUDA int64 tensor of one element");
  MK_CHECK(timeout_s > 0, op, "timeout_s must be > 0, got ", timeout_s);
  const c10::cuda::CUDAGuard guard(flags.device());
  ep::wait_kernel<<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint64_t*>(flags.data_ptr<int64_t>()), static_cast<int>(flags.size(0)),
      epoch.data_ptr<int64_t>(), static_cast<int64_t>(timeout_s * 1e9), device_error_flag());
  MK_CUDA_CHECK(cudaGetLastError(), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("ep_push_rows", &ep_push_rows);
  m.impl("ep_signal", &ep_signal);
  m.impl("ep_wait", &ep_wait);
}

}  // namespace moe_kernels
