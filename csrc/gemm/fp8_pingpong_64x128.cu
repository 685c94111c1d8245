// One CUTLASS instantiation per translation unit (they compile in parallel): Fp8Pingpong64x128.
#include "gemm/grouped_gemm_cutlass.cuh"

namespace moe_kernels {
namespace gemm {

size_t fp8_pingpong_64x128_workspace_bytes(const GroupedGemmProblem& p, int sm_count) {
  return GroupedGemm<Fp8Pingpong64x128>::workspace_bytes(p, sm_count);
}

cudaError_t fp8_pingpong_64x128_run(const GroupedGemmProblem& p, void* workspace, int sm_count,
                                    cudaStream_t stream) {
  return GroupedGemm<Fp8Pingpong64x128>::run(p, workspace, sm_count, stream);
}

}  // namespace gemm
}  // namespace moe_kernels
