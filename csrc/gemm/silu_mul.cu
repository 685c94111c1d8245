// Launchers of the fused SwiGLU activation (+ FP8 re-quantisation) of the expert MLP and its backward.
#include "moe_kernels/silu_mul.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

// The checks both directions share: h bf16 [rows, 2I] with I a multiple of 128, optional offsets.
void check_silu_args(const at::Tensor& h_in, const std::optional<at::Tensor>& expert_offsets,
                     const char* op) {
  MK_CHECK_CUDA_TENSOR(h_in, op, "h");
  MK_CHECK_DIM(h_in, 2, op, "h", "[rows, 2 * intermediate]");
  MK_CHECK_DTYPE(h_in, at::kBFloat16, op, "h");
  MK_CHECK(h_in.size(1) % (2 * kQuantBlock) == 0, op,
           "h's width must be 2 * intermediate with intermediate a multiple of 128, got ", h_in.size(1));
  if (expert_offsets.has_value()) {
    MK_CHECK_DTYPE(*expert_offsets, at::kInt, op, "expert_offsets");
    MK_CHECK(expert_offsets->dim() == 1 && expert_offsets->size(0) >= 2, op,
             "expert_offsets must be [experts + 1], got shape ", shape_str(*expert_offsets));
    MK_CHECK_SAME_DEVICE(*expert_offsets, h_in, op, "expert_offsets", "h");
  }
  check_hopper(h_in, op);
}

std::tuple<at::Tensor, at::Tensor> silu_mul(const at::Tensor& h_in,
                                            const std::optional<at::Tensor>& expert_offsets, bool quantize,
                                            bool pow2_scale) {
  constexpr const char* op = "silu_mul";
  check_silu_args(h_in, expert_offsets, op);
  const int64_t rows = h_in.size(0), intermediate = h_in.size(1) / 2;
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

// (grad_h bf16 [M, 2I], act bf16 [M, I] or [0], grad_h e4m3 [M, 2I] or [0], its scales [M, 2I/128] or
// [0]); rows outside [offsets[0], offsets[E]) are left unwritten.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> silu_mul_backward(
    const at::Tensor& grad_act_in, const at::Tensor& h_in, const std::optional<at::Tensor>& expert_offsets,
    bool return_act, bool quantize, bool pow2_scale) {
  constexpr const char* op = "silu_mul_backward";
  check_silu_args(h_in, expert_offsets, op);
  const int64_t rows = h_in.size(0), intermediate = h_in.size(1) / 2;
  MK_CHECK_CUDA_TENSOR(grad_act_in, op, "grad_act");
  MK_CHECK_DTYPE(grad_act_in, at::kBFloat16, op, "grad_act");
  MK_CHECK(grad_act_in.dim() == 2 && grad_act_in.size(0) == rows && grad_act_in.size(1) == intermediate, op,
           "grad_act must be [rows=", rows, ", intermediate=", intermediate, "], got shape ",
           shape_str(grad_act_in));
  MK_CHECK_SAME_DEVICE(grad_act_in, h_in, op, "grad_act", "h");
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), grad_act = grad_act_in.contiguous();
  const auto bf16 = h.options();
  at::Tensor grad_h = at::empty({rows, 2 * intermediate}, bf16);
  at::Tensor act = at::empty({return_act ? rows : 0, intermediate}, bf16);
  at::Tensor grad_h_fp8 = at::empty({quantize ? rows : 0, 2 * intermediate}, bf16.dtype(at::kFloat8_e4m3fn));
  at::Tensor grad_h_scales =
      at::empty({quantize ? rows : 0, 2 * intermediate / kQuantBlock}, bf16.dtype(at::kFloat));
  SiluMulBackwardParams p{};
  p.h = static_cast<const __nv_bfloat16*>(h.data_ptr());
  p.grad_act = static_cast<const __nv_bfloat16*>(grad_act.data_ptr());
  p.expert_offsets = expert_offsets.has_value() ? expert_offsets->data_ptr<int32_t>() : nullptr;
  p.num_experts = expert_offsets.has_value() ? static_cast<int>(expert_offsets->size(0) - 1) : 0;
  p.rows = rows;
  p.intermediate = static_cast<int>(intermediate);
  p.grad_h = static_cast<__nv_bfloat16*>(grad_h.data_ptr());
  p.act = return_act ? static_cast<__nv_bfloat16*>(act.data_ptr()) : nullptr;
  p.grad_h_fp8 = quantize ? static_cast<__nv_fp8_storage_t*>(grad_h_fp8.data_ptr()) : nullptr;
  p.grad_h_scales = quantize ? grad_h_scales.data_ptr<float>() : nullptr;
  p.pow2_scale = pow2_scale;
  MK_CUDA_CHECK(launch_silu_mul_backward(p, at::cuda::getCurrentCUDAStream()), op);
  return {grad_h, act, grad_h_fp8, grad_h_scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("silu_mul", &silu_mul);
  m.impl("silu_mul_backward", &silu_mul_backward);
}

}  // namespace moe_kernels
