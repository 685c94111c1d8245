// Our FP8 kernel, one CTA per 128x192 tile, K at run time. "auto" takes fp8_wgmma_kc_128x192, the
// same kernel with the common K compiled in; this one stays as the reference it is measured against.
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_WGMMA_CONFIG(fp8_wgmma_128x192, CfgV2_192x4)
