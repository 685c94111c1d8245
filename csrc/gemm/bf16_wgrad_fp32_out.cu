// One CUTLASS instantiation per translation unit (they compile in parallel): GroupedGemm<Bf16Cooperative128x256, WgradBf16<float>>.
#include "gemm/grouped_gemm_cutlass.cuh"

namespace moe_kernels {
namespace gemm {

size_t bf16_wgrad_fp32_out_workspace_bytes(const WgradProblem& p, int sm_count) {
  return GroupedGemm<Bf16Cooperative128x256, WgradBf16<float>>::workspace_bytes(p, sm_count);
}

cudaError_t bf16_wgrad_fp32_out_run(const WgradProblem& p, void* workspace, int sm_count, cudaStream_t stream) {
  return GroupedGemm<Bf16Cooperative128x256, WgradBf16<float>>::run(p, workspace, sm_count, stream);
}

}  // namespace gemm
}  // namespace moe_kernels
