// Our FP8 kernel on clusters of two CTAs on neighbouring m-tiles of one expert that share the B
// (weight) tile by multicast (DeepGEMM's cluster_m = 2), with K compiled in for the K of the common
// models (run_fp8_wgmma_constant_k; other K run the run-time-K kernel of the same cluster). Halves
// the weight traffic from L2 per tile pair. Selectable, not chosen by "auto": in the library's
// interleaved run (H100, 2026-12-07) 4% faster than one CTA per tile (fp8_wgmma_kc_128x192) on
// 256 experts' realistic gate_up, 1% on EP8 gate_up, 3-16% slower on the skewed, down,
// balanced-256 and Qwen3 rows (the prototype had measured 9-10% faster on both gate_up rows).
#include "gemm/grouped_gemm_wgmma.cuh"

MOE_DEFINE_OWN_KERNEL_CONFIG(fp8_wgmma_mpair_kc_128x192,
                             (run_fp8_wgmma_constant_k<fp8g::CfgV4_192x4_K, fp8g::CfgV4_192x4>))
