// SwiGLU activation of the expert MLP, fused with the FP8 re-quantisation of its output
// (framework-free): act = SiLU(gate) * up for h = [gate | up] of shape [M, 2I], bf16 in, and
// either bf16 [M, I] out or e4m3 [M, I] + fp32 1x128 scales [M, I/128] (quantize_fp8's rules).
// Only rows in [offsets[0], offsets[E]) are computed: the rest of a permuted buffer holds no rows.
// The backward (silu_mul_backward_kernel) gives grad_h = [grad_gate | grad_up] from grad_act, and
// optionally the activation recomputed (the down projection's wgrad operand) and grad_h in e4m3 1x128.
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

// Whether `row` lies in [offsets[0], offsets[E]) (every row when there are no offsets): the rest of a
// permuted buffer holds no pair.
__device__ __forceinline__ bool row_in_experts(int64_t row, const int32_t* offsets, int num_experts,
                                               int64_t rows) {
  if (offsets == nullptr) {
    return row < rows;
  }
  return row >= max(int64_t(offsets[0]), int64_t(0)) && row < min(int64_t(offsets[num_experts]), rows);
}

template <int N>
__device__ __forceinline__ void store_bf16(const float (&v)[N], __nv_bfloat16* out) {
  Vec16<__nv_bfloat16> o;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    o.v[i] = from_float<__nv_bfloat16>(v[i]);
  }
  *reinterpret_cast<Vec16<__nv_bfloat16>*>(out) = o;
}

// 16 lanes quantise their 8 values of one 128-channel group: the lanes of a group share a row and
// reach this together; the other half of the warp may hold a skipped row, so the shuffle names only
// this half (`half`).
__device__ __forceinline__ void quantize_group(const float (&v)[kSiluVec], const unsigned half,
                                               bool pow2_scale, __nv_fp8_storage_t* out, float* scale_out,
                                               bool writes_scale) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kSiluVec; ++i) {
    amax = fmaxf(amax, finite_abs(v[i]));
  }
#pragma unroll
  for (int offset = kSiluThreadsPerGroup / 2; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(half, amax, offset, kSiluThreadsPerGroup));
  }
  const float scale = fp8_scale(amax, pow2_scale);
  const float inv_scale = fp8_inverse_scale(scale);
  __align__(8) __nv_fp8x2_storage_t q[kSiluVec / 2];
#pragma unroll
  for (int i = 0; i < kSiluVec / 2; ++i) {
    q[i] = quantize_pair(v[2 * i], v[2 * i + 1], inv_scale);
  }
  *reinterpret_cast<uint2*>(out) = *reinterpret_cast<uint2*>(q);
  if (writes_scale) {
    *scale_out = scale;
  }
}

__global__ void __launch_bounds__(kSiluThreads) silu_mul_kernel(const SiluMulParams p) {
  const int64_t groups_per_row = p.intermediate / kQuantBlock;
  const int64_t g = blockIdx.x * int64_t(kSiluGroupsPerBlock) + threadIdx.x / kSiluThreadsPerGroup;
  const int lane_in_group = threadIdx.x % kSiluThreadsPerGroup;
  const int64_t row = g / groups_per_row;
  // Groups of a row stay within 16 aligned lanes, so a skipped row skips whole shuffle groups.
  if (!row_in_experts(row, p.expert_offsets, p.num_experts, p.rows)) {
    return;
  }
  const int64_t col = (g % groups_per_row) * kQuantBlock + lane_in_group * kSiluVec;
  const __nv_bfloat16* h_row = p.h + row * 2 * p.intermediate;
  const Vec16<__nv_bfloat16> gate = *reinterpret_cast<const Vec16<__nv_bfloat16>*>(h_row + col);
  const Vec16<__nv_bfloat16> up =
      *reinterpret_cast<const Vec16<__nv_bfloat16>*>(h_row + p.intermediate + col);
  float act[kSiluVec];
#pragma unroll
  for (int i = 0; i < kSiluVec; ++i) {
    act[i] = silu(to_float(gate.v[i])) * to_float(up.v[i]);
  }
  const int64_t out_offset = row * p.intermediate + col;
  if (p.out_fp8 == nullptr) {
    store_bf16(act, p.out_bf16 + out_offset);
    return;
  }
  quantize_group(act, 0xffffu << (threadIdx.x & 16), p.pow2_scale, p.out_fp8 + out_offset, p.out_scales + g,
                 lane_in_group == 0);
}

inline cudaError_t launch_silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  const int64_t groups = p.rows * (p.intermediate / kQuantBlock);
  if (groups == 0) {
    return cudaSuccess;
  }
  silu_mul_kernel<<<(groups + kSiluGroupsPerBlock - 1) / kSiluGroupsPerBlock, kSiluThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

struct SiluMulBackwardParams {
  const __nv_bfloat16* h;         // [M, 2I]
  const __nv_bfloat16* grad_act;  // [M, I]
  const int32_t* expert_offsets;  // [E + 1] or nullptr (all rows)
  int num_experts;
  int64_t rows;
  int intermediate;                // I
  __nv_bfloat16* grad_h;           // [M, 2I]
  __nv_bfloat16* act;              // [M, I] or nullptr
  __nv_fp8_storage_t* grad_h_fp8;  // [M, 2I] or nullptr
  float* grad_h_scales;            // [M, 2I / 128] or nullptr
  bool pow2_scale;
};

// d act / d gate = up * s * (1 + gate * (1 - s)) with s = sigmoid(gate); d act / d up = SiLU(gate).
__global__ void __launch_bounds__(kSiluThreads) silu_mul_backward_kernel(const SiluMulBackwardParams p) {
  const int64_t groups_per_row = p.intermediate / kQuantBlock;
  const int64_t g = blockIdx.x * int64_t(kSiluGroupsPerBlock) + threadIdx.x / kSiluThreadsPerGroup;
  const int lane_in_group = threadIdx.x % kSiluThreadsPerGroup;
  const int64_t row = g / groups_per_row;
  if (!row_in_experts(row, p.expert_offsets, p.num_experts, p.rows)) {
    return;
  }
  const int64_t group_in_row = g % groups_per_row;
  const int64_t col = group_in_row * kQuantBlock + lane_in_group * kSiluVec;
  const int64_t width = 2 * int64_t(p.intermediate);
  const __nv_bfloat16* h_row = p.h + row * width;
  const Vec16<__nv_bfloat16> gate = *reinterpret_cast<const Vec16<__nv_bfloat16>*>(h_row + col);
  const Vec16<__nv_bfloat16> up =
      *reinterpret_cast<const Vec16<__nv_bfloat16>*>(h_row + p.intermediate + col);
  const Vec16<__nv_bfloat16> grad =
      *reinterpret_cast<const Vec16<__nv_bfloat16>*>(p.grad_act + row * p.intermediate + col);
  float grad_gate[kSiluVec], grad_up[kSiluVec], act[kSiluVec];
#pragma unroll
  for (int i = 0; i < kSiluVec; ++i) {
    const float x = to_float(gate.v[i]), u = to_float(up.v[i]), dy = to_float(grad.v[i]);
    const float s = 1.0f / (1.0f + expf(-x));
    const float silu_x = x * s;
    grad_gate[i] = dy * u * s * (1.0f + x * (1.0f - s));
    grad_up[i] = dy * silu_x;
    act[i] = silu_x * u;
  }
  __nv_bfloat16* grad_row = p.grad_h + row * width;
  store_bf16(grad_gate, grad_row + col);
  store_bf16(grad_up, grad_row + p.intermediate + col);
  if (p.act != nullptr) {
    store_bf16(act, p.act + row * p.intermediate + col);
  }
  if (p.grad_h_fp8 != nullptr) {
    const unsigned half = 0xffffu << (threadIdx.x & 16);  // see quantize_group
    const bool writes_scale = lane_in_group == 0;
    float* scale_row = p.grad_h_scales + row * (2 * groups_per_row);
    quantize_group(grad_gate, half, p.pow2_scale, p.grad_h_fp8 + row * width + col, scale_row + group_in_row,
                   writes_scale);
    quantize_group(grad_up, half, p.pow2_scale, p.grad_h_fp8 + row * width + p.intermediate + col,
                   scale_row + groups_per_row + group_in_row, writes_scale);
  }
}

inline cudaError_t launch_silu_mul_backward(const SiluMulBackwardParams& p, cudaStream_t stream) {
  const int64_t groups = p.rows * (p.intermediate / kQuantBlock);
  if (groups == 0) {
    return cudaSuccess;
  }
  silu_mul_backward_kernel<<<(groups + kSiluGroupsPerBlock - 1) / kSiluGroupsPerBlock, kSiluThreads, 0,
                             stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moe_kernels
