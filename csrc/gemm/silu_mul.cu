// Launcher of the fused SwiGLU activation (+ FP8 re-quantisation) of the expert MLP.
#include "moe_kernels/silu_mul.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> silu_mul(const at::Tensor& h_in,
                                            const std::optional<at::Tensor>& expert_offsets, bool quantize,
                                            bool pow2_scale) {
  constexpr const char* op = "silu_mul";
  MK_CHECK_CUDA_TENSOR(h_in, op, "h");
  MK_CHECK_DIM(h_in, 2, op, "h", "[rows, 2 * intermediate]");
  MK_CHECK_DTYPE(h_in, at::kBFloat16, op, "h");
  const int64_t rows = h_in.size(0), intermediate = h_in.size(1) / 2;
  MK_CHECK(h_in.size(1) % 2 == 0 && intermediate % kQuantBlock == 0, op,
           "h's width must be 2 * intermediate with intermediate a multiple of 128, got ", h_in.size(1));
  if (expert_offsets.has_value()) {
    MK_CHECK_DTYPE(*expert_offsets, at::kInt, op, "expert_offsets");
    MK_CHECK(expert_offsets->dim() == 1 && expert_offsets->size(0) >= 2, op,
             "expert_offsets must be [experts + 1], got shape ", shape_str(*expert_offsets));
    MK_CHECK_SAME_DEVICE(*expert_offsets, h_in, op, "expert_offsets", "h");
  }
  check_hopper(h_in, op);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  at::Tensor out =
      at::empty({rows, intermediate}, h.options().dtype(quantize ? at::kFloat8_e4m3fn : at::kBFloat16));
  at::Tensor scales =
      at::empty({quantize ? rows : 0, intermediate / kQuantBlock}, h.options().dtype(at::kFloat));
  SiluMulParams p{};
  p.h = static_cast<const __nv_bfloat16*>(h.data_ptr());
  p.expert_offsets = expert_offsets.has_value() ? expert_offsets->data_ptr<int32_t>() : nullptr;
  p.num_experts = expert_offsets.has_value() ? static_cast<int>(expert_offsets->size(0) - 1) : 0;
  p.rows = rows;
  p.intermediate = static_cast<int>(intermediate);
  p.out_bf16 = quantize ? nullptr : static_cast<__nv_bfloat16*>(out.data_ptr());
  p.out_fp8 = quantize ? static_cast<__nv_fp8_storage_t*>(out.data_ptr()) : nullptr;
  p.out_scales = quantize ? scales.data_ptr<float>() : nullptr;
  p.pow2_scale = pow2_scale;
  MK_CUDA_CHECK(launch_silu_mul(p, at::cuda::getCurrentCUDAStream()), op);
  return {out, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("silu_mul", &silu_mul);
}

}  // namespace moe_kernels
