// fp8_wgmma_tall_kc_128x128 (tiles whose last m-tile of an expert takes up to 192 rows) with its
// weight tiles in a ring of their own (ConfigV2::B_STAGES): 6 stages of B (96 KB in flight per SM
// against 64 KB in the shared ring) next to 3 of A and the scales, a second producer warp filling
// it. Where the weight stream bounds the time (256 experts, ~128 rows per expert) the bytes of B in
// flight per SM bound the rate at which an SM can pull its weights from DRAM.
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(
    fp8_wgmma_tall_b6_kc_128x128,
    (run_fp8_wgmma_constant_k<fp8g::CfgV2_128x3_K_TALL_B6, fp8g::CfgV2_128x3_TALL_B6>))
