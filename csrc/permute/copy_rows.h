// Host side of permute's row copy, shared by permute and the expert-parallel pack and unpack:
// each source row read once (optionally quantised to FP8 1x128 in the same pass) and written to
// every row its row_map entries name.
#pragma once

#include "moe_kernels/permute.cuh"
#include "torch_utils.h"

namespace moe_kernels {

// The fields every copy sets: rows named by row_map [tokens, k], written to out (and out_scales
// when out is FP8). Padding fields stay zero (no padding) unless the caller sets them.
inline PermuteCopyParams copy_rows_params(const int* row_map, int64_t k, int64_t tokens, at::Tensor& out,
                                          at::Tensor& out_scales) {
  const bool fp8_out = out.scalar_type() == kFp8;
  PermuteCopyParams copy{};
  copy.row_map = row_map;
  copy.top_k = static_cast<int>(k);
  copy.num_tokens = tokens;
  copy.out = static_cast<uint4*>(out.data_ptr());
  copy.out_scales = fp8_out ? out_scales.data_ptr<float>() : nullptr;
  copy.row_vecs = out.size(1) * out.element_size() / 16;
  copy.groups = static_cast<int>(out.size(1) / kQuantBlock);
  copy.num_out_rows = static_cast<int>(out.size(0));
  return copy;
}

// Launches the copy of x's rows (with their scales when x is FP8), or their fused quantisation.
inline void launch_copy_rows(const PermuteCopyParams& copy, const at::Tensor& x_in,
                             const std::optional<at::Tensor>& x_scales_in, bool quantize, bool pow2_scale,
                             const char* op) {
  const at::Tensor x = aligned_rows(x_in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (quantize) {
    dispatch_float_type(x.scalar_type(), op, "x", [&](auto* type_tag) {
      using T = std::remove_pointer_t<decltype(type_tag)>;
      MK_CUDA_CHECK(launch_permute_quantize<T>(copy, static_cast<const T*>(x.data_ptr()), x.stride(0),
                                               pow2_scale, stream),
                    op);
    });
    return;
  }
  const bool fp8_in = x.scalar_type() == kFp8;
  const at::Tensor x_scales = fp8_in ? x_scales_in->contiguous() : at::Tensor();
  MK_CUDA_CHECK(launch_permute_copy(copy, x.data_ptr(), x.stride(0) * x.element_size(),
                                    fp8_in ? x_scales.data_ptr<float>() : nullptr, stream),
                op);
}

}  // namespace moe_kernels
