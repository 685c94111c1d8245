// Our FP8 kernel as fp8_wgmma_2cta_128x192 (A multicast to two neighbouring n-tiles), with the
// tail tiles of at most 64 rows split by columns between the math warpgroups (SPLIT_NARROW).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_WGMMA_CONFIG(fp8_wgmma_2cta_ns_128x192, CfgV3_192x4_NS)
