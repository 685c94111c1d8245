// Our FP8 kernel as fp8_wgmma_128x192 and fp8_wgmma_2cta_128x192, with K compiled in for the K of
// the common models: hidden 7168 (DeepSeek-V3, Kimi-K2) and 4096 (Qwen3-235B, Mixtral), expert
// widths 2048 and 1536. A constant K gives the k-loop a constant trip count (unrolled by 8), keeps
// the wgmma descriptors in uniform registers and takes the idle-warpgroup branch out of the k-loop,
// as in DeepGEMM, which compiles every shape into its kernel: 141-149 instructions per k-block of a
// math warp against 192 (static SASS). Other K run the run-time-K kernel of the same tile.
#include "gemm/grouped_gemm_wgmma.cuh"

namespace moe_kernels::gemm {
namespace {
template <class Cfg>
cudaError_t run_cfg(const GroupedGemmProblem& p, int sm_count, cudaStream_t stream) {
  return fp8g::fp8_grouped_run<Cfg>(p.a, p.a_scales, p.b, p.b_scales, p.expert_offsets, p.out, p.error_flag,
                                    p.m_total, p.n, p.k, p.num_experts, p.device, sm_count, pdl_enabled(),
                                    stream);
}

// CfgK<K> for the K compiled in, Cfg (K at run time) for any other K.
template <template <int> class CfgK, class Cfg>
cudaError_t run_constant_k(const GroupedGemmProblem& p, int sm_count, cudaStream_t stream) {
  switch (p.k) {
    case 7168:
      return run_cfg<CfgK<7168>>(p, sm_count, stream);
    case 4096:
      return run_cfg<CfgK<4096>>(p, sm_count, stream);
    case 2048:
      return run_cfg<CfgK<2048>>(p, sm_count, stream);
    case 1536:
      return run_cfg<CfgK<1536>>(p, sm_count, stream);
    default:
      return run_cfg<Cfg>(p, sm_count, stream);
  }
}
}  // namespace

size_t fp8_wgmma_kc_128x192_workspace_bytes(const GroupedGemmProblem&, int) {
  return 0;
}
cudaError_t fp8_wgmma_kc_128x192_run(const GroupedGemmProblem& p, void*, int sm_count, cudaStream_t stream) {
  return run_constant_k<fp8g::CfgV2_192x4_K, fp8g::CfgV2_192x4>(p, sm_count, stream);
}

size_t fp8_wgmma_2cta_kc_128x192_workspace_bytes(const GroupedGemmProblem&, int) {
  return 0;
}
cudaError_t fp8_wgmma_2cta_kc_128x192_run(const GroupedGemmProblem& p, void*, int sm_count,
                                          cudaStream_t stream) {
  return run_constant_k<fp8g::CfgV3_192x4_K, fp8g::CfgV3_192x4>(p, sm_count, stream);
}
}  // namespace moe_kernels::gemm
