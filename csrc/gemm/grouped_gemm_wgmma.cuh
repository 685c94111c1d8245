// The FP8 grouped GEMM configurations that run our own kernel (moe_kernels/fp8_grouped_sm90.cuh:
// TMA, wgmma, promotion every 128 of K in registers, warp-specialised producer, no CUTLASS) instead
// of a CUTLASS instantiation. Same entry points as grouped_gemm_cutlass.cuh's configurations; the
// kernel reads the offsets itself, so no workspace and no setup kernel.
#pragma once

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
