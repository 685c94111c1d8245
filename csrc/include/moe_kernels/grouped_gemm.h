// Framework-free interface of the grouped GEMM configurations (csrc/gemm/*.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe_kernels {
namespace gemm {

struct GroupedGemmProblem {
  const void* a;                  // [M, K] e4m3 or bf16, row-major
  const void* b;                  // [E, N, K], K contiguous
  void* out;                      // [M, N] bf16, row-major
  const float* a_scales;          // FP8: [M, K/128]; BF16: nullptr
  const float* b_scales;          // FP8: [E, N/128, K/128]; BF16: nullptr
  const int32_t* expert_offsets;  // [E + 1], on the device
  int* error_flag;                // the sticky device-error flag (moe_kernels/device_error.cuh)
  int64_t m_total;
  int n, k, num_experts, device;
};

// One pair per configuration, each defined in its own translation unit.
#define MOE_DECLARE_GROUPED_GEMM(name)                                      \
  size_t name##_workspace_bytes(const GroupedGemmProblem& p, int sm_count); \
  cudaError_t name##_run(const GroupedGemmProblem& p, void* workspace, int sm_count, cudaStream_t stream);
MOE_DECLARE_GROUPED_GEMM(fp8_cooperative_128x128)
MOE_DECLARE_GROUPED_GEMM(fp8_pingpong_64x128)
MOE_DECLARE_GROUPED_GEMM(bf16_cooperative_128x128)
MOE_DECLARE_GROUPED_GEMM(bf16_cooperative_128x256)
MOE_DECLARE_GROUPED_GEMM(bf16_pingpong_64x128)
#undef MOE_DECLARE_GROUPED_GEMM

}  // namespace gemm
}  // namespace moe_kernels
