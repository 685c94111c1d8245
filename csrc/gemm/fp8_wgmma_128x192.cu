// Our FP8 kernel, one CTA per 128x192 tile (the fastest variant at ~1000 rows per expert).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_WGMMA_CONFIG(fp8_wgmma_128x192, CfgV2_192x4)
