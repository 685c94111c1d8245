// Framework-free interface of the grouped GEMM configurations (csrc/gemm/*.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe_kernels {
namespace gemm {

// Forward (and, with b read untransposed, BF16 dgrad): out[rows of e] = a[rows of e] @ op(b[e]).
// Forward: b [E, N, K] used as b[e]^T. Dgrad: b [E, K, N] (the forward's weight, whose N is this
// GEMM's reduction K) used as b[e]; n and k are always this GEMM's output width and reduction.
struct GroupedGemmProblem {
  const void* a;                  // [M, K] e4m3 or bf16, row-major
  const void* b;                  // forward: [E, N, K], K contiguous; dgrad: [E, K, N], N contiguous
  void* out;                      // [M, N] bf16, row-major
  const float* a_scales;          // FP8: [M, K/128]; BF16: nullptr
  const float* b_scales;          // FP8: [E, N/128, K/128]; BF16: nullptr
  const int32_t* expert_offsets;  // [E + 1], on the device
  int* error_flag;                // the sticky device-error flag (moe_kernels/device_error.cuh)
  int64_t m_total;
  int n, k, num_experts, device;
};

// Weight gradient, grouped along the reduction: out[e] = grad[rows of e]^T @ act[rows of e], [N, K]
// per expert, fp32 accumulation, bf16 or fp32 out. An expert without rows gets zeros.
//   BF16: grad [M, N] and act [M, K] row-major as the forward left them; offsets are row offsets.
//   FP8: both operands transposed and quantised per expert (quantize_fp8_grouped_t): expert e's
//   block of grad is [N, R_e] e4m3 at grad + N * offsets[e] with scales [N, R_e / 128] at
//   grad_scales + N * offsets[e] / 128 (act likewise with K), R_e = offsets[e+1] - offsets[e] a
//   multiple of 128 (the padded offsets).
struct WgradProblem {
  const void* grad;
  const void* act;
  void* out;                      // [E, N, K] row-major, bf16 or fp32
  const float* grad_scales;       // FP8 only
  const float* act_scales;        // FP8 only
  const int32_t* expert_offsets;  // [E + 1] on the device
  int* error_flag;
  int64_t m_total;  // rows of grad / act (BF16) or of the padded blocks (FP8)
  int n, k, num_experts, device;
};

// One pair per configuration, each defined in its own translation unit.
#define MOE_DECLARE_GROUPED_GEMM(name)                                      \
  size_t name##_workspace_bytes(const GroupedGemmProblem& p, int sm_count); \
  cudaError_t name##_run(const GroupedGemmProblem& p, void* workspace, int sm_count, cudaStream_t stream);
MOE_DECLARE_GROUPED_GEMM(fp8_cooperative_128x128)
MOE_DECLARE_GROUPED_GEMM(fp8_pingpong_64x128)
// Our own kernel (moe_kernels/fp8_grouped_sm90.cuh), K at run time, then its variants.
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_128x192)
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_kc_128x192)  // K compiled in for the common K
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_2cta_kc_128x192)
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_mpair_kc_128x192)
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_tall_kc_128x128)          // an expert's last m-tile takes up to 192 rows
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_tall_b6_kc_128x128)       // the same, its weight tiles in a 6-stage ring
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_tall_b8_kc_128x128)       // 8 stages of B, 2 of A
MOE_DECLARE_GROUPED_GEMM(fp8_wgmma_tall_b6_swap_kc_128x128)  // b6, the tail's rows as the wgmma's N
MOE_DECLARE_GROUPED_GEMM(bf16_cooperative_128x128)
MOE_DECLARE_GROUPED_GEMM(bf16_cooperative_128x256)
MOE_DECLARE_GROUPED_GEMM(bf16_pingpong_64x128)
MOE_DECLARE_GROUPED_GEMM(bf16_wgmma_128x256)  // our own kernel (moe_kernels/bf16_grouped_sm90.cuh)
MOE_DECLARE_GROUPED_GEMM(bf16_dgrad_cooperative_128x256)
MOE_DECLARE_GROUPED_GEMM(bf16_dgrad_pingpong_64x128)
#undef MOE_DECLARE_GROUPED_GEMM

#define MOE_DECLARE_WGRAD(name)                                       \
  size_t name##_workspace_bytes(const WgradProblem& p, int sm_count); \
  cudaError_t name##_run(const WgradProblem& p, void* workspace, int sm_count, cudaStream_t stream);
MOE_DECLARE_WGRAD(bf16_wgrad_bf16_out)
MOE_DECLARE_WGRAD(bf16_wgrad_fp32_out)
MOE_DECLARE_WGRAD(fp8_wgrad_bf16_out)
MOE_DECLARE_WGRAD(fp8_wgrad_fp32_out)
MOE_DECLARE_WGRAD(bf16_wgrad_pingpong_64x256)  // bf16 out only
MOE_DECLARE_WGRAD(fp8_wgrad_pingpong_64x128)   // bf16 out only
#undef MOE_DECLARE_WGRAD

}  // namespace gemm
}  // namespace moe_kernels
