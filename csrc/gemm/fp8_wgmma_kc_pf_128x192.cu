// fp8_wgmma_kc_128x192 with the weight tile of k-block kb + 4 (pf4) or kb + 8 (pf8) prefetched into
// L2 as k-block kb is loaded (ConfigV2::B_PREFETCH). With ~128 rows per expert (256 experts on one
// GPU) each weight tile is read from HBM once and the kernel is bound by the weight stream at 80-88%
// of copy (H100), with at most its 4 stages of B (96 KB) in flight per SM; the prefetch keeps 4 or 8
// more k-blocks in flight through L2. Selectable; the benchmark ranks them against
// fp8_wgmma_kc_128x192 in the same process.
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_kc_pf4_128x192,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV2_192x4_K_PF4, fp8g::CfgV2_192x4>))
MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_kc_pf8_128x192,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV2_192x4_K_PF8, fp8g::CfgV2_192x4>))
