// One CUTLASS instantiation per translation unit (they compile in parallel).
#include "gemm/grouped_gemm_cutlass.cuh"

MOE_DEFINE_GEMM_CONFIG(bf16_wgrad_pingpong_64x256, WgradProblem,
                       GroupedGemm<Bf16Pingpong64x256, WgradBf16<cutlass::bfloat16_t>>)
