// One CUTLASS instantiation per translation unit (they compile in parallel).
#include "gemm/grouped_gemm_cutlass.cuh"

MOE_DEFINE_GEMM_CONFIG(fp8_wgrad_pingpong_64x128, WgradProblem,
                       GroupedGemm<Fp8Pingpong64x128, WgradFp8<cutlass::bfloat16_t>>)
