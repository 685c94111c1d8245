// One CUTLASS instantiation per translation unit (they compile in parallel).
#include "gemm/grouped_gemm_cutlass.cuh"

MOE_DEFINE_GEMM_CONFIG(fp8_pingpong_64x128, GroupedGemmProblem, GroupedGemm<Fp8Pingpong64x128>)
