// fp8_wgmma_tall_b6_kc_128x128 with the tail rows swapped (ConfigV2::TAIL_SWAP): a tall tile's tail
// of up to 32 rows is computed as D^T, the warpgroup's 64 weight rows as the wgmma's M and the
// tail's rows as its N, rounded up to 16 or 32, instead of an m64n64 whatever the tail's size
// (longer tails keep the m64n64). With realistic 256-expert loads (128 +- 11 rows per expert) most
// tails have 1-32 rows: the tensor work of a tall tile drops from 192 rows to 144-160, which
// matters where the weight stream is fast enough (the H200's) for the tall tiles' compute to show.
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(
    fp8_wgmma_tall_b6_swap_kc_128x128,
    (run_fp8_wgmma_constant_k<fp8g::CfgV2_128x3_K_TALL_B6_SWAP, fp8g::CfgV2_128x3_TALL_B6_SWAP>))
