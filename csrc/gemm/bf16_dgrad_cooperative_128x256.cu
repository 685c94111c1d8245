// One CUTLASS instantiation per translation unit (they compile in parallel): GroupedGemm<Bf16Cooperative128x256, Dgrad>.
#include "gemm/grouped_gemm_cutlass.cuh"

namespace moe_kernels {
namespace gemm {

size_t bf16_dgrad_cooperative_128x256_workspace_bytes(const GroupedGemmProblem& p, int sm_count) {
  return GroupedGemm<Bf16Cooperative128x256, Dgrad>::workspace_bytes(p, sm_count);
}

cudaError_t bf16_dgrad_cooperative_128x256_run(const GroupedGemmProblem& p, void* workspace, int sm_count, cudaStream_t stream) {
  return GroupedGemm<Bf16Cooperative128x256, Dgrad>::run(p, workspace, sm_count, stream);
}

}  // namespace gemm
}  // namespace moe_kernels
