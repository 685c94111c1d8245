// One CUTLASS instantiation per translation unit (they compile in parallel).
#include "gemm/grouped_gemm_cutlass.cuh"

MOE_DEFINE_GEMM_CONFIG(bf16_dgrad_pingpong_64x128, GroupedGemmProblem, GroupedGemm<Bf16Pingpong64x128, Dgrad>)
