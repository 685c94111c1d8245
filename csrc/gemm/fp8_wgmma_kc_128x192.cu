// Our FP8 kernels on one CTA per 128x192 tile (fp8_wgmma_128x192's) and on clusters of two CTAs on
// neighbouring n-tiles that share the A tile, with K compiled in for the K of the common models
// (run_fp8_wgmma_constant_k; other K run the run-time-K kernel of the same tile).
// A constant K gives the k-loop a constant trip count (unrolled), keeps the wgmma descriptors in
// uniform registers and takes the idle-warpgroup branch out of the k-loop, as in DeepGEMM, which
// compiles every shape into its kernel: 141-149 instructions per k-block of a math warp against
// 192 (static SASS).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_kc_128x192,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV2_192x4_K, fp8g::CfgV2_192x4>))
MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_2cta_kc_128x192,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV3_192x4_K, fp8g::CfgV3_192x4>))
