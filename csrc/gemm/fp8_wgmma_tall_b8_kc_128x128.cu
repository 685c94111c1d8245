// fp8_wgmma_tall_b6_kc_128x128 with 8 stages of B (128 KB of weights in flight per SM) and 2 of A:
// A comes from the L2 (an expert's rows are re-read by each of its n-tiles) and is loaded one
// k-block ahead of the math warps. Measured beside b6 and the shared ring, it tells how the
// weight-bound rows scale with the bytes of B in flight.
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(
    fp8_wgmma_tall_b8_kc_128x128,
    (run_fp8_wgmma_constant_k<fp8g::CfgV2_128x2_K_TALL_B8, fp8g::CfgV2_128x2_TALL_B8>))
