// Launcher of the transposing per-expert FP8 quantisation (the FP8 wgrad's operands).
#include "common/device_error.h"
#include "moe_kernels/quantize_fp8_t.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

// (q e4m3 [capacity * C], scales fp32 [capacity / 128 * C], padded_offsets int32 [E + 1]) with
// capacity = (M / 128 + E) * 128; the layout is in moe_kernels/quantize_fp8_t.cuh.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp8_transposed(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_scales_in, const at::Tensor& expert_offsets,
    bool pow2_scale) {
  constexpr const char* op = "quantize_fp8_transposed";
  MK_CHECK_CUDA_TENSOR(x_in, op, "x");
  MK_CHECK_DIM(x_in, 2, op, "x", "[rows, channels]");
  const bool fp8 = x_in.scalar_type() == kFp8;
  MK_CHECK(fp8 || x_in.scalar_type() == at::kBFloat16, op, "x must be bfloat16 or float8_e4m3fn, got ",
           x_in.scalar_type());
  const int64_t rows = x_in.size(0), channels = x_in.size(1);
  MK_CHECK(channels % kQuantBlock == 0 && channels > 0, op,
           "x's channels must be a positive multiple of 128, got ", channels);
  MK_CHECK(fp8 == x_scales_in.has_value(), op,
           fp8 ? "float8_e4m3fn x needs x_scales (1x128)" : "bfloat16 x takes no x_scales");
  MK_CHECK_DTYPE(expert_offsets, at::kInt, op, "expert_offsets");
  MK_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) >= 2, op,
           "expert_offsets must be [experts + 1], got shape ", shape_str(expert_offsets));
  MK_CHECK_SAME_DEVICE(expert_offsets, x_in, op, "expert_offsets", "x");
  at::Tensor x_scales;
  if (fp8) {
    x_scales = x_scales_in->contiguous();
    MK_CHECK_DTYPE(x_scales, at::kFloat, op, "x_scales");
    MK_CHECK_SAME_DEVICE(x_scales, x_in, op, "x_scales", "x");
    MK_CHECK(x_scales.dim() == 2 && x_scales.size(0) == rows && x_scales.size(1) == channels / kQuantBlock,
             op, "x_scales must be [rows=", rows, ", channels/128=", channels / kQuantBlock, "], got shape ",
             shape_str(x_scales));
  }
  check_hopper(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int num_experts = static_cast<int>(expert_offsets.size(0) - 1);
  const int64_t capacity = transposed_capacity(rows, num_experts);
  at::Tensor q = at::empty({capacity * channels}, x.options().dtype(kFp8));
  at::Tensor scales = at::empty({capacity / kQuantBlock * channels}, x.options().dtype(at::kFloat));
  at::Tensor padded = at::empty({num_experts + 1}, expert_offsets.options());
  QuantizeTransposedParams p{};
  p.x = x.data_ptr();
  p.x_scales = fp8 ? x_scales.data_ptr<float>() : nullptr;
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  p.padded_offsets = padded.data_ptr<int32_t>();
  p.q = static_cast<__nv_fp8_storage_t*>(q.data_ptr());
  p.scales = scales.data_ptr<float>();
  p.error_flag = device_error_flag();
  p.rows = rows;
  p.channels = static_cast<int>(channels);
  p.num_experts = num_experts;
  p.pow2_scale = pow2_scale;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (fp8) {
    MK_CUDA_CHECK(launch_quantize_fp8_transposed<__nv_fp8_storage_t>(p, stream), op);
  } else {
    MK_CUDA_CHECK(launch_quantize_fp8_transposed<__nv_bfloat16>(p, stream), op);
  }
  return {q, scales, padded};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("quantize_fp8_transposed", &quantize_fp8_transposed);
}

}  // namespace moe_kernels
