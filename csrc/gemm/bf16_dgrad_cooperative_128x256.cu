// One CUTLASS instantiation per translation unit (they compile in parallel).
#include "gemm/grouped_gemm_cutlass.cuh"

MOE_DEFINE_GEMM_CONFIG(bf16_dgrad_cooperative_128x256, GroupedGemmProblem,
                       GroupedGemm<Bf16Cooperative128x256, Dgrad>)
