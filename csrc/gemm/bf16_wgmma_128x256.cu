// Our BF16 kernel, one CTA per 128x256 tile: one m64n256k16 wgmma per warpgroup and k-step, 3 stages,
// the whole tile in smem_d (the prototype's BN256_S3_D4, its best variant on the H200).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_BF16_WGMMA_CONFIG(bf16_wgmma_128x256, CfgBf16_256x3_D4)
