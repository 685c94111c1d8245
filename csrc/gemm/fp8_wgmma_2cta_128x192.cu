// Our FP8 kernel, clusters of two CTAs on neighbouring 128x192 tiles that share the A tile by TMA
// multicast (the fastest variant at ~128 rows per expert).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_WGMMA_CONFIG(fp8_wgmma_2cta_128x192, CfgV3_192x4)
