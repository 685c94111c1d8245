// One CUTLASS instantiation per translation unit (they compile in parallel): Bf16Cooperative128x128.
#include "gemm/grouped_gemm_cutlass.cuh"

namespace moe_kernels {
namespace gemm {

size_t bf16_cooperative_128x128_workspace_bytes(const GroupedGemmProblem& p, int sm_count) {
  return GroupedGemm<Bf16Cooperative128x128>::workspace_bytes(p, sm_count);
}

cudaError_t bf16_cooperative_128x128_run(const GroupedGemmProblem& p, void* workspace, int sm_count,
                                         cudaStream_t stream) {
  return GroupedGemm<Bf16Cooperative128x128>::run(p, workspace, sm_count, stream);
}

}  // namespace gemm
}  // namespace moe_kernels
