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

namespace moe_kernels::gemm {
// One FP8 problem on configuration Cfg (an fp8g::ConfigV2 alias).
template <class Cfg>
cudaError_t run_fp8_wgmma(const GroupedGemmProblem& p, int sm_count, cudaStream_t stream) {
  return fp8g::fp8_grouped_run<Cfg>(p.a, p.a_scales, p.b, p.b_scales, p.expert_offsets, p.out, p.error_flag,
                                    p.m_total, p.n, p.k, p.num_experts, p.device, sm_count, pdl_enabled(),
                                    stream);
}

// CfgK<K> with K compiled in for the K of the common models (hidden 7168: DeepSeek-V3, Kimi-K2;
// 4096: Qwen3-235B, Mixtral; expert widths 2048 and 1536), Cfg (K at run time) for any other K.
template <template <int> class CfgK, class Cfg>
cudaError_t run_fp8_wgmma_constant_k(const GroupedGemmProblem& p, int sm_count, cudaStream_t stream) {
  switch (p.k) {
    case 7168:
      return run_fp8_wgmma<CfgK<7168>>(p, sm_count, stream);
    case 4096:
      return run_fp8_wgmma<CfgK<4096>>(p, sm_count, stream);
    case 2048:
      return run_fp8_wgmma<CfgK<2048>>(p, sm_count, stream);
    case 1536:
      return run_fp8_wgmma<CfgK<1536>>(p, sm_count, stream);
    default:
      return run_fp8_wgmma<Cfg>(p, sm_count, stream);
  }
}

// One BF16 problem on configuration Cfg (a bf16g::Config alias).
template <class Cfg>
cudaError_t run_bf16_wgmma(const GroupedGemmProblem& p, int sm_count, cudaStream_t stream) {
  return bf16g::bf16_grouped_run<Cfg>(p.a, p.b, p.expert_offsets, p.out, p.error_flag, p.m_total, p.n, p.k,
                                      p.num_experts, p.device, sm_count, pdl_enabled(), stream);
}
}  // namespace moe_kernels::gemm

// A configuration of our kernels: `run(p, sm_count, stream)` is one of the functions above.
#define MOE_DEFINE_OWN_KERNEL_CONFIG(name, run)                                                   \
  namespace moe_kernels::gemm {                                                                   \
  size_t name##_workspace_bytes(const GroupedGemmProblem&, int) {                                 \
    return 0;                                                                                     \
  }                                                                                               \
  cudaError_t name##_run(const GroupedGemmProblem& p, void*, int sm_count, cudaStream_t stream) { \
    return run(p, sm_count, stream);                                                              \
  }                                                                                               \
  }
// The FP8 kernel on Cfg, an fp8g::ConfigV2 alias.
#define MOE_DEFINE_WGMMA_CONFIG(name, Cfg) MOE_DEFINE_OWN_KERNEL_CONFIG(name, run_fp8_wgmma<fp8g::Cfg>)
// The BF16 kernel on Cfg, a bf16g::Config alias.
#define MOE_DEFINE_BF16_WGMMA_CONFIG(name, Cfg) MOE_DEFINE_OWN_KERNEL_CONFIG(name, run_bf16_wgmma<bf16g::Cfg>)
