// One CUTLASS instantiation per translation unit (they compile in parallel): Bf16Cooperative128x256.
#include "gemm/grouped_gemm_cutlass.cuh"

namespace moe_kernels {
namespace gemm {

size_t bf16_cooperative_128x256_workspace_bytes(const GroupedGemmProblem& p, int sm_count) {
  return GroupedGemm<Bf16Cooperative128x256>::workspace_bytes(p, sm_count);
}

cudaError_t bf16_cooperative_128x256_run(const GroupedGemmProblem& p, void* workspace, int sm_count,
                                         cudaStream_t stream) {
  return GroupedGemm<Bf16Cooperative128x256>::run(p, workspace, sm_count, stream);
}

}  // namespace gemm
}  // namespace moe_kernels
