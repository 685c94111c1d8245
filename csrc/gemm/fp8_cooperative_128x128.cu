// One CUTLASS instantiation per translation unit (they compile in parallel).
#include "gemm/grouped_gemm_cutlass.cuh"

MOE_DEFINE_GEMM_CONFIG(fp8_cooperative_128x128, GroupedGemmProblem, GroupedGemm<Fp8Cooperative128x128>)
