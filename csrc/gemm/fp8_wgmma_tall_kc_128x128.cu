// Our FP8 kernel on 128x128 tiles whose last m-tile of an expert takes up to 192 rows (ConfigV2::TALL:
// rows 128-191 split by column between the two math warpgroups, an m64n64 wgmma each next to their
// m64n128 one), K compiled in for the common K (run_fp8_wgmma_constant_k; other K run the
// run-time-K kernel of the same tile). Every expert of 1-192 rows is then one m-tile: with 256
// experts and realistic loads (128 +- 11 rows) half of the experts no longer take a second, nearly
// empty tile that streams the expert's weights again. "auto" takes it up to 160 rows per expert
// (csrc/gemm/grouped_gemm.cu).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_tall_kc_128x128,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV2_128x4_K_TALL, fp8g::CfgV2_128x4_TALL>))
