// SwiGLU activation of the expert MLP, fused with the FP8 re-quantisation of its output
// (framework-free): act = SiLU(gate) * up for h = [gate | up] of shape [M, 2I], bf16 in, and
// either bf16 [M, I] out or e4m3 [M, I] + fp32 1x128 scales [M, I/128] (quantize_fp8's rules).
// Only rows in [offsets[0], offsets[E]) are computed: the rest of a permuted buffer holds no rows.
#pragma once

#include <cuda_runtime.h>

#include "moe_kernels/fp8.cuh"
#include "moe_kernels/vec.cuh"

namespace moe_kernels {

struct SiluMulParams {
  const __nv_bfloat16* h;         // [M, 2I]
  const int32_t* expert_offsets;  // [E + 1] or nullptr (all rows)
  int num_experts;
  int64_t rows;
  int intermediate;             // I
  __nv_bfloat16* out_bf16;      // [M, I] or nullptr
  __nv_fp8_storage_t* out_fp8;  // [M, I] or nullptr
  float* out_scales;            // [M, I/128] or nullptr
  bool pow2_scale;
};

constexpr int kSiluThreads = 256;
constexpr int kSiluVec = 8;                                   // bf16 per 16-byte load
constexpr int kSiluThreadsPerGroup = kQuantBlock / kSiluVec;  // 16 lanes own 128 channels
constexpr int kSiluGroupsPerBlock = kSiluThreads / kSiluThreadsPerGroup;

__device__ __forceinline__ float silu(float x) {
  return x / (1.0f + expf(-x));
}

__global__ void __launch_bounds__(kSiluThreads) silu_mul_kernel(const SiluMulParams p) {
  const int64_t groups_per_row = p.intermediate / kQuantBlock;
  const int64_t g = blockIdx.x * int64_t(kSiluGroupsPerBlock) + threadIdx.x / kSiluThreadsPerGroup;
  const int lane_in_group = threadIdx.x % kSiluThreadsPerGroup;
  const int64_t row = g / groups_per_row;
  int64_t first_row = 0, end_row = p.rows;
  if (p.expert_offsets != nullptr) {
    first_row = max(int64_t(p.expert_offsets[0]), int64_t(0));
    end_row = min(int64_t(p.expert_offsets[p.num_experts]), p.rows);
  }
  // Groups of a row stay within 16 aligned lanes, so a skipped row skips whole shuffle groups.
  if (row < first_row || row >= end_row) {
    return;
  }
  const int64_t col = (g % groups_per_row) * kQuantBlock + lane_in_group * kSiluVec;
  const __nv_bfloat16* h_row = p.h + row * 2 * p.intermediate;
  const Vec16<__nv_bfloat16> gate = *reinterpret_cast<const Vec16<__nv_bfloat16>*>(h_row + col);
  const Vec16<__nv_bfloat16> up =
      *reinterpret_cast<const Vec16<__nv_bfloat16>*>(h_row + p.intermediate + col);
  float act[kSiluVec];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kSiluVec; ++i) {
    act[i] = silu(to_float(gate.v[i])) * to_float(up.v[i]);
    amax = fmaxf(amax, finite_abs(act[i]));
  }
  const int64_t out_offset = row * p.intermediate + col;
  if (p.out_fp8 == nullptr) {
    Vec16<__nv_bfloat16> out;
#pragma unroll
    for (int i = 0; i < kSiluVec; ++i) {
      out.v[i] = from_float<__nv_bfloat16>(act[i]);
    }
    *reinterpret_cast<Vec16<__nv_bfloat16>*>(p.out_bf16 + out_offset) = out;
    return;
  }
  // The 16 lanes of a group share a row and reach this together; the other half of the warp may
  // hold a skipped row, so the shuffle names only this half.
  const unsigned half = 0xffffu << (threadIdx.x & 16);
#pragma unroll
  for (int offset = kSiluThreadsPerGroup / 2; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(half, amax, offset, kSiluThreadsPerGroup));
  }
  const float scale = fp8_scale(amax, p.pow2_scale);
  const float inv_scale = fp8_inverse_scale(scale);
  __align__(8) __nv_fp8x2_storage_t q[kSiluVec / 2];
#pragma unroll
  for (int i = 0; i < kSiluVec / 2; ++i) {
    q[i] = quantize_pair(act[2 * i], act[2 * i + 1], inv_scale);
  }
  *reinterpret_cast<uint2*>(p.out_fp8 + out_offset) = *reinterpret_cast<uint2*>(q);
  if (lane_in_group == 0) {
    p.out_scales[g] = scale;
  }
}

inline cudaError_t launch_silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  const int64_t groups = p.rows * (p.intermediate / kQuantBlock);
  if (groups == 0) {
    return cudaSuccess;
  }
  silu_mul_kernel<<<(groups + kSiluGroupsPerBlock - 1) / kSiluGroupsPerBlock, kSiluThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moe_kernels
