// Programmatic dependent launch (Hopper): a kernel launched by launch_pdl(..., overlap = true, ...)
// may start while the kernel before it in the stream is still running, so short dependent kernels
// (permute's index chain and its copy) overlap their launch and their independent prologue with
// their predecessor. Such a kernel calls pdl_wait() before it reads anything its predecessor writes
// (the wait returns once that grid has completed and its writes are visible; for a normal launch it
// returns at once), and a predecessor may call pdl_launch_dependents() to let the next kernel start
// before it ends. MOE_KERNELS_PDL=0 in the environment turns the early start off (plain stream order).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "moe_kernels/env.h"

namespace moe_kernels {

__device__ __forceinline__ void pdl_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void pdl_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

inline bool pdl_enabled() {
  static const bool enabled = env_int("MOE_KERNELS_PDL", 1) != 0;
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...); with overlap, allowed to start before the stream's
// previous kernel has finished (see above), else a plain launch.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       bool overlap, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = overlap && pdl_enabled() ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace moe_kernels
