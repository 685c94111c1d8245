// Our FP8 kernel, clusters of two CTAs on neighbouring m-tiles of one expert that share the weight
// (B) tile by TMA multicast (SHARE_B: half of B's L2 -> SM traffic), with split tail tiles.
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_WGMMA_CONFIG(fp8_wgmma_mpair_ns_128x192, CfgV4_192x4_NS)
