// Our FP8 kernel as fp8_wgmma_128x192, but a tile of at most 64 rows (an expert's tail) gives each
// math warpgroup 96 of its 192 columns instead of leaving one warpgroup idle (SPLIT_NARROW).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_WGMMA_CONFIG(fp8_wgmma_ns_128x192, CfgV2_192x4_NS)
