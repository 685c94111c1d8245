// Launcher of permute: argument checks (the messages of moe_kernels/_checks.py), device guard,
// current stream, outputs and workspace sized from host-known T, K, E, align and R only.
#include <limits>

#include "common/device_error.h"
#include "moe_kernels/permute.cuh"
#include "permute/copy_rows.h"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();

void check_permute_args(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                        const at::Tensor& expert_ids, int64_t num_experts, int64_t first_expert,
                        int64_t num_local, int64_t align, bool quantize, int64_t num_out_rows) {
  constexpr const char* op = "permute";
  MK_CHECK_CUDA_TENSOR(x, op, "x");
  MK_CHECK_DIM(x, 2, op, "x", "[tokens, hidden]");
  MK_CHECK_DIM(expert_ids, 2, op, "expert_ids", "[tokens, top_k]");
  MK_CHECK_SAME_DEVICE(x, expert_ids, op, "x", "expert_ids");
  const auto dtype = x.scalar_type();
  MK_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == kFp8, op,
           "x must be bfloat16 or float16 or float32 or float8_e4m3fn, got ", dtype_name(dtype));
  MK_CHECK(expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong, op,
           "expert_ids must be int32 or int64, got ", dtype_name(expert_ids.scalar_type()));
  MK_CHECK(expert_ids.size(0) == x.size(0), op, "expert_ids has ", expert_ids.size(0), " rows, x has ",
           x.size(0));
  const int64_t top_k = expert_ids.size(1);
  MK_CHECK(top_k >= 1 && top_k <= kPermuteMaxTopK, op, "top_k (expert_ids.shape[1]) must be in [1, ",
           kPermuteMaxTopK, "], got ", top_k);
  MK_CHECK(align == 1 || align == 16 || align == 64 || align == 128, op,
           "align must be one of (1, 16, 64, 128), got ", align);
  MK_CHECK(num_experts >= 1 && num_experts <= kMaxRows && first_expert >= 0 && num_local >= 1 &&
               num_local <= kPermuteMaxLocalExperts && first_expert + num_local <= num_experts,
           op, "local experts [first_expert, first_expert + num_local_experts) = [", first_expert, ", ",
           first_expert + num_local, ") must lie in [0, num_experts=", num_experts, ") and hold 1 to ",
           kPermuteMaxLocalExperts, " experts");
  const int64_t hidden = x.size(1);
  if (dtype == kFp8) {
    MK_CHECK(x_scales.has_value(), op, "x is float8_e4m3fn: pass its 1x128 scales as x_scales");
    MK_CHECK(!quantize, op, "x is already FP8: quantize must be False");
  }
  if (dtype == kFp8 || quantize) {
    MK_CHECK(hidden % kQuantBlock == 0, op,
             "x's channels must be a multiple of 128 (one scale per 128), got ", hidden);
  }
  MK_CHECK(hidden * x.element_size() % 16 == 0, op,
           "x's rows must be a multiple of 16 bytes (hidden a multiple of ", 16 / x.element_size(), " for ",
           dtype_name(dtype), "), got hidden=", hidden);
  if (x_scales.has_value()) {
    const at::Tensor& s = *x_scales;
    MK_CHECK(dtype == kFp8, op, "x_scales is only for float8_e4m3fn x, got x ", dtype_name(dtype));
    MK_CHECK_SAME_DEVICE(x, s, op, "x", "x_scales");
    MK_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == x.size(0) &&
                 s.size(1) == hidden / kQuantBlock,
             op, "x_scales must be float32 [tokens, hidden/128] = [", x.size(0), ", ", hidden / kQuantBlock,
             "], got ", dtype_name(s.scalar_type()), " ", shape_str(s));
  }
  MK_CHECK(num_out_rows >= 0 && num_out_rows <= kMaxRows, op, "num_out_rows must be in [0, 2^31), got ",
           num_out_rows);
  const int64_t bound = x.size(0) * top_k + num_local * (align - 1);
  MK_CHECK(bound <= kMaxRows, op, "tokens * top_k + local experts * (align - 1) = ", bound,
           " rows must fit in int32");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_scales_in, const at::Tensor& ids_in,
    int64_t num_experts, int64_t first_expert, int64_t num_local, int64_t align, bool quantize,
    bool pow2_scale, int64_t num_out_rows) {
  constexpr const char* op = "permute";
  check_permute_args(x_in, x_scales_in, ids_in, num_experts, first_expert, num_local, align, quantize,
                     num_out_rows);
  check_hopper(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t tokens = x_in.size(0), hidden = x_in.size(1), top_k = ids_in.size(1);
  const bool fp8_in = x_in.scalar_type() == kFp8;
  const bool fp8_out = fp8_in || quantize;
  const auto options = x_in.options();

  at::Tensor out = at::empty({num_out_rows, hidden}, options.dtype(fp8_out ? kFp8 : x_in.scalar_type()));
  // Not FP8: an empty [0] tensor (the schema has no optional outputs); the Python front door gives None.
  at::Tensor out_scales = fp8_out ? at::empty({num_out_rows, hidden / kQuantBlock}, options.dtype(at::kFloat))
                                  : at::empty({0}, options.dtype(at::kFloat));
  at::Tensor row_map = at::empty({tokens, top_k}, options.dtype(at::kInt));
  if (tokens == 0) {
    return {out, out_scales, at::zeros({num_local + 1}, options.dtype(at::kInt)), row_map};
  }
  at::Tensor expert_offsets = at::empty({num_local + 1}, options.dtype(at::kInt));

  const at::Tensor ids = ids_in.contiguous();
  const int pairs_per_chunk = permute_pairs_per_chunk(tokens * top_k, static_cast<int>(top_k));
  const int64_t tokens_per_chunk = pairs_per_chunk / top_k;
  const int64_t num_chunks = (tokens + tokens_per_chunk - 1) / tokens_per_chunk;
  // Workspace: [chunks, experts] counts / first rows, expert_start [E + 1], expert_count [E].
  at::Tensor workspace = at::empty({num_chunks * num_local + 2 * num_local + 1}, options.dtype(at::kInt));
  int* ws = workspace.data_ptr<int>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int* error_flag = device_error_flag();

  PermuteIndexParams index{};
  index.num_pairs = tokens * top_k;
  index.pairs_per_chunk = pairs_per_chunk;
  index.num_chunks = static_cast<int>(num_chunks);
  index.num_experts = static_cast<int>(num_experts);
  index.first_expert = static_cast<int>(first_expert);
  index.num_local = static_cast<int>(num_local);
  index.align = static_cast<int>(align);
  index.num_out_rows = static_cast<int>(num_out_rows);
  index.chunk_rows = ws;
  index.expert_start = ws + num_chunks * num_local;
  index.expert_count = index.expert_start + num_local + 1;
  index.expert_offsets = expert_offsets.data_ptr<int>();
  index.row_map = row_map.data_ptr<int>();
  index.error_flag = error_flag;
  if (ids.scalar_type() == at::kLong) {
    MK_CUDA_CHECK(launch_permute_index(index, ids.data_ptr<int64_t>(), stream), op);
  } else {
    MK_CUDA_CHECK(launch_permute_index(index, ids.data_ptr<int32_t>(), stream), op);
  }

  PermuteCopyParams copy = copy_rows_params(index.row_map, top_k, tokens, out, out_scales);
  copy.expert_start = index.expert_start;
  copy.expert_count = index.expert_count;
  copy.num_out_rows = index.num_out_rows;
  copy.pad_blocks_per_expert =
      align > 1 ? static_cast<int>((align - 1 + kPermutePadRowsPerBlock - 1) / kPermutePadRowsPerBlock) : 0;
  copy.num_pad_blocks = copy.pad_blocks_per_expert * index.num_local;
  copy.after_index = true;
  copy.early_x = first_expert == 0 && num_local == num_experts;
  if (num_out_rows == 0 || hidden == 0) {
    return {out, out_scales, expert_offsets, row_map};  // no bytes to move
  }
  launch_copy_rows(copy, x_in, x_scales_in, quantize, pow2_scale, op);
  return {out, out_scales, expert_offsets, row_map};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("permute", &permute);
}

}  // namespace moe_kernels
