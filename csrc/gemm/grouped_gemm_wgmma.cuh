// The grouped GEMM configurations that run our own kernels instead of a CUTLASS instantiation: FP8
// (moe_kernels/fp8_grouped_sm90.cuh: TMA, wgmma, promotion every 128 of K in registers,
// warp-specialised producer) and BF16 (moe_kernels/bf16_grouped_sm90.cuh, its variant without
// scales). No CUTLASS. Same entry points as grouped_gemm_cutlass.cuh's configurations; the kernels
// read the offsets themselves, so no workspace and no setup kernel.
#pragma once

#include "moe_kernels/bf16_grouped_sm90.cuh"
#include "moe_kernels/fp8_grouped_sm90.cuh"
#include "moe_kernels/grouped_gemm.h"
#include "moe_kernels/pdl.cuh"

#define MOE_DEFINE_WGMMA_CONFIG(name, Cfg)                                                              \
  namespace moe_kernels::gemm {                                                                         \
  size_t name##_workspace_bytes(const GroupedGemmProblem&, int) {                                       \
    return 0;                                                                                           \
  }                                                                                                     \
  cudaError_t name##_run(const GroupedGemmProblem& p, void*, int sm_count, cudaStream_t stream) {       \
    return fp8g::fp8_grouped_run<fp8g::Cfg>(p.a, p.a_scales, p.b, p.b_scales, p.expert_offsets, p.out,  \
                                            p.error_flag, p.m_total, p.n, p.k, p.num_experts, p.device, \
                                            sm_count, pdl_enabled(), stream);                           \
  }                                                                                                     \
  }

// The BF16 kernel's configurations (Cfg: a bf16g::Config alias).
#define MOE_DEFINE_BF16_WGMMA_CONFIG(name, Cfg)                                                            \
  namespace moe_kernels::gemm {                                                                            \
  size_t name##_workspace_bytes(const GroupedGemmProblem&, int) {                                          \
    return 0;                                                                                              \
  }                                                                                                        \
  cudaError_t name##_run(const GroupedGemmProblem& p, void*, int sm_count, cudaStream_t stream) {          \
    return bf16g::bf16_grouped_run<bf16g::Cfg>(p.a, p.b, p.expert_offsets, p.out, p.error_flag, p.m_total, \
                                               p.n, p.k, p.num_experts, p.device, sm_count, pdl_enabled(), \
                                               stream);                                                    \
  }                                                                                                        \
  }
