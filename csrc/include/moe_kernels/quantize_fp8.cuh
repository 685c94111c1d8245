// FP8 e4m3 quantisation kernels (framework-free).
//
//  * activations [M, K] -> e4m3 [M, K] + fp32 scales [M, K/128]   (one scale per row per 128 channels)
//  * weights [B, N, K]  -> e4m3 [B, N, K] + fp32 scales [B, ceil(N/128), K/128]  (128x128 blocks)
//  * dequantisation of either layout.
// Scale and rounding rules live in fp8.cuh; these kernels only move data around them.
#pragma once

#include <cuda_runtime.h>

#include "moe_kernels/fp8.cuh"
#include "moe_kernels/vec.cuh"

namespace moe_kernels {

// ---------------------------------------------------------------------------------------------
// Activations, 1x128 groups. Each thread owns one 16-byte vector of a group (8 bf16/fp16 or 4 fp32
// values), kThreadsPerGroup consecutive lanes own a group, and every thread keeps kUnroll groups
// in flight so enough bytes are outstanding to saturate HBM.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct ActQuantConfig {
  static constexpr int kVec = Vec16<T>::kSize;
  static constexpr int kThreadsPerGroup = kQuantBlock / kVec;  // 16 (2-byte types) or 32 (fp32)
  static constexpr int kThreads = 256;
  static constexpr int kGroupsPerPass = kThreads / kThreadsPerGroup;
  static constexpr int kUnroll = 4;
  static constexpr int kGroupsPerBlock = kGroupsPerPass * kUnroll;
};

template <typename T>
__global__ void __launch_bounds__(ActQuantConfig<T>::kThreads)
    quantize_fp8_1x128_kernel(const T* __restrict__ x, int64_t x_row_stride,
                              __nv_fp8_storage_t* __restrict__ q, float* __restrict__ scales,
                              int64_t num_groups, int64_t groups_per_row, bool pow2_scale) {
  using Cfg = ActQuantConfig<T>;
  constexpr int kVec = Cfg::kVec;
  const int lane_in_group = threadIdx.x % Cfg::kThreadsPerGroup;
  const int64_t first_group =
      blockIdx.x * int64_t(Cfg::kGroupsPerBlock) + threadIdx.x / Cfg::kThreadsPerGroup;

  Vec16<T> in[Cfg::kUnroll] = {};
#pragma unroll
  for (int u = 0; u < Cfg::kUnroll; ++u) {
    const int64_t g = first_group + u * Cfg::kGroupsPerPass;
    if (g < num_groups) {
      // 64-bit division only for row-strided views; contiguous rows are one flat array.
      const int64_t offset = x_row_stride == groups_per_row * kQuantBlock
                                 ? g * kQuantBlock
                                 : (g / groups_per_row) * x_row_stride + (g % groups_per_row) * kQuantBlock;
      in[u] = *reinterpret_cast<const Vec16<T>*>(x + offset + lane_in_group * kVec);
    }
  }
#pragma unroll
  for (int u = 0; u < Cfg::kUnroll; ++u) {
    const int64_t g = first_group + u * Cfg::kGroupsPerPass;
    float v[kVec];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      v[i] = to_float(in[u].v[i]);
      amax = fmaxf(amax, finite_abs(v[i]));
    }
    // Every lane joins the shuffle (groups never straddle a warp), then only in-range groups store.
    amax = group_max<Cfg::kThreadsPerGroup>(amax);
    if (g >= num_groups) {
      continue;
    }
    const float scale = fp8_scale(amax, pow2_scale);
    const float inv_scale = fp8_inverse_scale(scale);
    __align__(kVec) __nv_fp8x2_storage_t out[kVec / 2];
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      out[i] = quantize_pair(v[2 * i], v[2 * i + 1], inv_scale);
    }
    // q is contiguous, so group g starts at g * 128 whatever the input's row stride.
    __nv_fp8_storage_t* dst = q + g * kQuantBlock + lane_in_group * kVec;
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<uint2*>(out);
    } else {
      *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<uint32_t*>(out);
    }
    if (lane_in_group == 0) {
      scales[g] = scale;
    }
  }
}

template <typename T>
cudaError_t launch_quantize_fp8_1x128(const T* x, int64_t x_row_stride, __nv_fp8_storage_t* q, float* scales,
                                      int64_t rows, int64_t cols, bool pow2_scale, cudaStream_t stream) {
  using Cfg = ActQuantConfig<T>;
  const int64_t groups_per_row = cols / kQuantBlock;
  const int64_t num_groups = rows * groups_per_row;
  if (num_groups == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = (num_groups + Cfg::kGroupsPerBlock - 1) / Cfg::kGroupsPerBlock;
  quantize_fp8_1x128_kernel<T><<<blocks, Cfg::kThreads, 0, stream>>>(x, x_row_stride, q, scales, num_groups,
                                                                     groups_per_row, pow2_scale);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Weights, 128x128 blocks. One thread block per (column block, row block, batch); the whole tile
// stays in registers between the amax reduction and the conversion. Rows past N are skipped, so N
// need not be a multiple of 128 (the last row block is partial). Optionally also the transposed
// e4m3 copy (N a multiple of 128), through shared memory.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256)
    quantize_fp8_128x128_kernel(const T* __restrict__ w, __nv_fp8_storage_t* __restrict__ q,
                                float* __restrict__ scales, __nv_fp8_storage_t* __restrict__ q_t, int64_t n,
                                int64_t k, bool pow2_scale) {
  constexpr int kThreads = 256;
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kThreadsPerRow = kQuantBlock / kVec;
  constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  constexpr int kPasses = kQuantBlock / kRowsPerPass;
  const int64_t col = blockIdx.x * int64_t(kQuantBlock) + (threadIdx.x % kThreadsPerRow) * kVec;
  const int64_t row0 = blockIdx.y * int64_t(kQuantBlock) + threadIdx.x / kThreadsPerRow;
  const int64_t batch_offset = blockIdx.z * n * k;

  Vec16<T> in[kPasses] = {};
  float amax = 0.0f;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int64_t row = row0 + p * kRowsPerPass;
    if (row < n) {
      in[p] = *reinterpret_cast<const Vec16<T>*>(w + batch_offset + row * k + col);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        amax = fmaxf(amax, finite_abs(to_float(in[p].v[i])));
      }
    }
  }
  __shared__ float warp_amax[kThreads / 32];
  __shared__ __nv_fp8_storage_t tile[kQuantBlock][kQuantBlock + 16];  // for q_t only
  amax = group_max<32>(amax);
  if (threadIdx.x % 32 == 0) {
    warp_amax[threadIdx.x / 32] = amax;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) {
    amax = fmaxf(amax, warp_amax[i]);
  }
  const float scale = fp8_scale(amax, pow2_scale);
  const float inv_scale = fp8_inverse_scale(scale);
  if (threadIdx.x == 0) {
    scales[(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = scale;
  }
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int64_t row = row0 + p * kRowsPerPass;
    if (row < n) {
      __align__(kVec) __nv_fp8x2_storage_t out[kVec / 2];
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) {
        out[i] = quantize_pair(to_float(in[p].v[2 * i]), to_float(in[p].v[2 * i + 1]), inv_scale);
      }
      __nv_fp8_storage_t* dst = q + batch_offset + row * k + col;
      if constexpr (kVec == 8) {
        *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<uint2*>(out);
      } else {
        *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<uint32_t*>(out);
      }
      if (q_t != nullptr) {  // staged for the transposed copy below
        const int local_row = static_cast<int>(row - blockIdx.y * int64_t(kQuantBlock));
        const int local_col = static_cast<int>(col - blockIdx.x * int64_t(kQuantBlock));
        const auto* bytes = reinterpret_cast<const __nv_fp8_storage_t*>(out);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          tile[local_row][local_col + i] = bytes[i];
        }
      }
    }
  }
  if (q_t == nullptr) {
    return;
  }
  // The transposed copy [B, K, N] (the dgrad's weight operand; N a multiple of 128): the block's
  // tile, the same values and the same scale, written as its columns: thread (column c, half h)
  // writes 64 consecutive bytes of row c of the transpose.
  __syncthreads();
  const int c = threadIdx.x / 2, half = threadIdx.x % 2;
  __align__(16) __nv_fp8_storage_t column[kQuantBlock / 2];
#pragma unroll
  for (int i = 0; i < kQuantBlock / 2; ++i) {
    column[i] = tile[half * (kQuantBlock / 2) + i][c];
  }
  __nv_fp8_storage_t* dst = q_t + batch_offset + (blockIdx.x * int64_t(kQuantBlock) + c) * n +
                            blockIdx.y * int64_t(kQuantBlock) + half * (kQuantBlock / 2);
#pragma unroll
  for (int i = 0; i < kQuantBlock / 2; i += 16) {
    *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(column + i);
  }
}

template <typename T>
cudaError_t launch_quantize_fp8_128x128(const T* w, __nv_fp8_storage_t* q, float* scales, int64_t batch,
                                        int64_t n, int64_t k, bool pow2_scale, cudaStream_t stream,
                                        __nv_fp8_storage_t* q_t = nullptr) {
  if (batch == 0 || n == 0 || k == 0) {
    return cudaSuccess;
  }
  const dim3 grid(k / kQuantBlock, (n + kQuantBlock - 1) / kQuantBlock, batch);
  quantize_fp8_128x128_kernel<T><<<grid, 256, 0, stream>>>(w, q, scales, q_t, n, k, pow2_scale);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Dequantisation of [B, N, K] e4m3 with scales [B, ceil(N/row_block), K/128], row_block 1 or 128.
// Each thread turns 16 e4m3 bytes into 16 outputs.
// ---------------------------------------------------------------------------------------------
template <typename OutT>
__global__ void __launch_bounds__(256)
    dequantize_fp8_kernel(const __nv_fp8_storage_t* __restrict__ q, const float* __restrict__ scales,
                          OutT* __restrict__ out, int64_t num_vectors, int64_t n, int64_t k, int row_block) {
  constexpr int kIn = 16;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= num_vectors) {
    return;
  }
  const int64_t element = i * kIn;
  const int64_t col = element % k, row = (element / k) % n, batch = element / (n * k);
  const int64_t row_blocks = (n + row_block - 1) / row_block;
  const float scale = scales[(batch * row_blocks + row / row_block) * (k / kQuantBlock) + col / kQuantBlock];
  const uint4 raw = *reinterpret_cast<const uint4*>(q + element);
  const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
  Vec16<OutT> result[kIn / Vec16<OutT>::kSize];
  OutT* flat = reinterpret_cast<OutT*>(result);
#pragma unroll
  for (int p = 0; p < kIn / 2; ++p) {
    const float2 f = dequantize_pair(pairs[p], scale);
    flat[2 * p] = from_float<OutT>(f.x);
    flat[2 * p + 1] = from_float<OutT>(f.y);
  }
  Vec16<OutT>* dst = reinterpret_cast<Vec16<OutT>*>(out + element);
#pragma unroll
  for (int v = 0; v < kIn / Vec16<OutT>::kSize; ++v) {
    dst[v] = result[v];
  }
}

template <typename OutT>
cudaError_t launch_dequantize_fp8(const __nv_fp8_storage_t* q, const float* scales, OutT* out, int64_t batch,
                                  int64_t n, int64_t k, int row_block, cudaStream_t stream) {
  const int64_t num_vectors = batch * n * k / 16;
  if (num_vectors == 0) {
    return cudaSuccess;
  }
  dequantize_fp8_kernel<OutT>
      <<<(num_vectors + 255) / 256, 256, 0, stream>>>(q, scales, out, num_vectors, n, k, row_block);
  return cudaGetLastError();
}

}  // namespace moe_kernels
