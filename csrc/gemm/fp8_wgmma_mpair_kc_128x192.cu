// Our FP8 kernel on clusters of two CTAs on neighbouring m-tiles of one expert that share the B
// (weight) tile by multicast (DeepGEMM's cluster_m = 2), with K compiled in for the K of the common
// models (run_fp8_wgmma_constant_k; other K run the run-time-K kernel of the same cluster). Halves
// the weight traffic from L2 per tile pair: 9-10% faster than fp8_wgmma_kc_128x192 on the long-K
// gate_up projections (EP8 and 256 experts) in the prototype (H100, 2026-12-07), 4% slower on the
// EP8 down projection (K = 2048).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_mpair_kc_128x192,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV4_192x4_K, fp8g::CfgV4_192x4>))
