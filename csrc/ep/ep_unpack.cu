// Launcher of the expert-parallel unpack (receiver side, csrc/include/moe_kernels/ep.cuh): the rows
// every source sent, laid out expert-major as permute returns them, with the map and gate weights
// that combine needs. Output sized from host-known values only (no host sync).
#include <limits>

#include "common/device_error.h"
#include "moe_kernels/ep.cuh"
#include "permute/copy_rows.h"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

void check_unpack_args(const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& meta,
                       const at::Tensor& counts, int64_t num_local, int64_t source_capacity, int64_t align,
                       int64_t num_out_rows) {
  constexpr const char* op = "ep_unpack";
  MK_CHECK_CUDA_TENSOR(x, op, "recv_x");
  MK_CHECK_DIM(x, 2, op, "recv_x", "[rows, hidden]");
  const auto dtype = x.scalar_type();
  MK_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == kFp8, op,
           "recv_x must be bfloat16 or float16 or float32 or float8_e4m3fn, got ", dtype_name(dtype));
  MK_CHECK(x.size(1) * x.element_size() % 16 == 0, op,
           "recv_x's rows must be a multiple of 16 bytes, got hidden=", x.size(1));
  MK_CHECK(x_scales.has_value() == (dtype == kFp8), op,
           "recv_scales must be given exactly when recv_x is float8_e4m3fn");
  if (x_scales.has_value()) {
    const at::Tensor& s = *x_scales;
    MK_CHECK_SAME_DEVICE(x, s, op, "recv_x", "recv_scales");
    MK_CHECK(x.size(1) % kQuantBlock == 0 && s.scalar_type() == at::kFloat && s.dim() == 2 &&
                 s.size(0) == x.size(0) && s.size(1) == x.size(1) / kQuantBlock,
             op, "recv_scales must be float32 [rows, hidden/128] = [", x.size(0), ", ",
             x.size(1) / kQuantBlock, "], got ", dtype_name(s.scalar_type()), " ", shape_str(s));
  }
  MK_CHECK_SAME_DEVICE(x, meta, op, "recv_x", "recv_meta");
  MK_CHECK(meta.scalar_type() == at::kInt && meta.dim() == 3 && meta.size(0) == x.size(0) &&
               meta.size(1) == ep::kMetaFields && meta.size(2) >= 1 && meta.size(2) <= ep::kMaxTopK,
           op, "recv_meta must be int32 [rows, 3, top_k] with rows = ", x.size(0), " and top_k in [1, ",
           ep::kMaxTopK, "], got ", dtype_name(meta.scalar_type()), " ", shape_str(meta));
  MK_CHECK_SAME_DEVICE(x, counts, op, "recv_x", "recv_counts");
  MK_CHECK(counts.scalar_type() == at::kInt && counts.dim() == 2 && counts.size(0) >= 1 &&
               counts.size(0) <= ep::kMaxRanks && counts.size(1) >= 2,
           op, "recv_counts must be int32 [sources, 1 + local experts] with 1 to ", ep::kMaxRanks,
           " sources, got ", dtype_name(counts.scalar_type()), " ", shape_str(counts));
  MK_CHECK(num_local >= 1 && num_local <= counts.size(1) - 1 && num_local <= ep::kMaxLocalExperts, op,
           "num_local_experts must be in [1, recv_counts.shape[1] - 1 = ", counts.size(1) - 1, "] (at most ",
           ep::kMaxLocalExperts, "), got ", num_local);
  MK_CHECK(source_capacity >= 0 && (source_capacity == 0 || source_capacity * counts.size(0) == x.size(0)),
           op, "source_capacity must be 0 (sources back to back) or recv_x's rows / sources, got ",
           source_capacity);
  MK_CHECK(align == 1 || align == 16 || align == 64 || align == 128, op,
           "align must be one of (1, 16, 64, 128), got ", align);
  MK_CHECK(num_out_rows >= 0 && num_out_rows <= std::numeric_limits<int32_t>::max() &&
               x.size(0) <= std::numeric_limits<int32_t>::max(),
           op, "num_out_rows and the received rows must fit in int32, got ", num_out_rows, " and ",
           x.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_unpack(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_scales_in, const at::Tensor& meta_in,
    const at::Tensor& counts_in, int64_t num_local, int64_t source_capacity, int64_t align,
    int64_t num_out_rows) {
  constexpr const char* op = "ep_unpack";
  check_unpack_args(x_in, x_scales_in, meta_in, counts_in, num_local, source_capacity, align, num_out_rows);
  check_hopper(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t recv_rows = x_in.size(0), hidden = x_in.size(1), top_k = meta_in.size(2);
  const int64_t sources = counts_in.size(0);
  const bool fp8 = x_in.scalar_type() == kFp8;
  const auto options = x_in.options();
  at::Tensor out = at::empty({num_out_rows, hidden}, options);
  at::Tensor out_scales = fp8 ? at::empty({num_out_rows, hidden / kQuantBlock}, options.dtype(at::kFloat))
                              : at::empty({0}, options.dtype(at::kFloat));
  at::Tensor expert_offsets = at::empty({num_local + 1}, options.dtype(at::kInt));
  at::Tensor row_map = at::empty({recv_rows, top_k}, options.dtype(at::kInt));
  at::Tensor weights = at::empty({recv_rows, top_k}, options.dtype(at::kFloat));
  // Workspace: source_start [W + 1], base [W, L], expert_start [L + 1], expert_count [L].
  at::Tensor workspace =
      at::empty({sources + 1 + sources * num_local + 2 * num_local + 1}, options.dtype(at::kInt));
  const at::Tensor meta = meta_in.contiguous(), counts = counts_in.contiguous();

  ep::UnpackParams p{};
  p.num_ranks = static_cast<int>(sources);
  p.max_local = static_cast<int>(counts.size(1) - 1);
  p.num_local = static_cast<int>(num_local);
  p.source_capacity = static_cast<int>(source_capacity);
  p.align = static_cast<int>(align);
  p.num_out_rows = static_cast<int>(num_out_rows);
  p.num_recv_rows = recv_rows;
  p.top_k = static_cast<int>(top_k);
  p.recv_counts = counts.data_ptr<int>();
  p.recv_meta = meta.data_ptr<int>();
  int* ws = workspace.data_ptr<int>();
  p.source_start = ws;
  p.base = p.source_start + sources + 1;
  p.expert_start = p.base + sources * num_local;
  p.expert_count = p.expert_start + num_local + 1;
  p.expert_offsets = expert_offsets.data_ptr<int>();
  p.row_map = row_map.data_ptr<int>();
  p.weights = weights.data_ptr<float>();
  p.error_flag = device_error_flag();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ep::unpack_scan_kernel<<<1, kPermuteScanThreads, 0, stream>>>(p);
  if (recv_rows > 0) {
    ep::unpack_index_kernel<<<static_cast<unsigned>((recv_rows + ep::kThreads - 1) / ep::kThreads),
                              ep::kThreads, 0, stream>>>(p);
  }
  MK_CUDA_CHECK(cudaGetLastError(), op);

  // The rows move with permute's copy kernel: each receive row read once, written once per local
  // expert it goes to; the padding rows of every expert zeroed.
  PermuteCopyParams copy = copy_rows_params(p.row_map, p.top_k, recv_rows, out, out_scales);
  copy.expert_start = p.expert_start;
  copy.expert_count = p.expert_count;
  copy.pad_blocks_per_expert =
      align > 1 ? static_cast<int>((align - 1 + kPermutePadRowsPerBlock - 1) / kPermutePadRowsPerBlock) : 0;
  copy.num_pad_blocks = copy.pad_blocks_per_expert * p.num_local;
  if (num_out_rows == 0 || hidden == 0 || copy.num_pad_blocks + recv_rows == 0) {
    return {out, out_scales, expert_offsets, row_map, weights};
  }
  launch_copy_rows(copy, x_in, x_scales_in, false, false, op);
  return {out, out_scales, expert_offsets, row_map, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("ep_unpack", &ep_unpack);
}

}  // namespace moe_kernels
