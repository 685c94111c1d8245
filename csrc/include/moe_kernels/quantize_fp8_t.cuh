// Transposing FP8 quantisation per expert, for the FP8 weight-gradient GEMM (framework-free).
//
// The wgrad reduces over each expert's rows, and FP8 wgmma needs the reduction contiguous, so each
// expert's rows x[offsets[e] : offsets[e+1]] ([R, C], R rows) are written transposed, [C, R_pad]
// e4m3, with one fp32 scale per channel and 128 rows (DeepSeek-V3's 128x1 tiles for this GEMM).
// R_pad rounds R up to 128 with zero rows, so scale blocks never straddle two experts:
//   q:      expert e's block [C, R_pad_e] row-major at q + C * padded[e]
//   scales: expert e's block [R_pad_e / 128, C] row-major at scales + C * padded[e] / 128
//   padded: int32 [E + 1], padded[0] = 0, padded[e+1] = padded[e] + R_pad_e.
// The input is bf16, or e4m3 with 1x128 scales [M, C/128] (activations cached in FP8 by the
// forward), dequantised in fp32 and requantised in one pass. Capacity: (M / 128 + E) * 128 rows.
#pragma once

#include <cuda_runtime.h>

#include "moe_kernels/device_error.cuh"
#include "moe_kernels/fp8.cuh"
#include "moe_kernels/vec.cuh"

namespace moe_kernels {

struct QuantizeTransposedParams {
  const void* x;                  // [M, C] bf16 or e4m3
  const float* x_scales;          // [M, C / 128] for e4m3 input, else nullptr
  const int32_t* expert_offsets;  // [E + 1]
  int32_t* padded_offsets;        // [E + 1] out
  __nv_fp8_storage_t* q;          // capacity * C
  float* scales;                  // capacity / 128 * C
  int* error_flag;
  int64_t rows;  // M
  int channels;  // C, a multiple of 128
  int num_experts;
  bool pow2_scale;
};

constexpr int kTransposeThreads = 256;

// Clamped row range of expert e, the rule of the grouped GEMMs' setup (bad offsets are reported).
__device__ __forceinline__ void clamped_rows(const int32_t* offsets, int e, int64_t rows, int64_t& lo,
                                             int64_t& hi) {
  lo = min(max(int64_t(offsets[e]), int64_t(0)), rows);
  hi = min(max(int64_t(offsets[e + 1]), lo), rows);
}

// One warp: padded[e+1] = padded[e] + roundup(rows of e, 128), by a warp scan in chunks of 32.
__global__ void padded_offsets_kernel(const QuantizeTransposedParams p) {
  const int lane = threadIdx.x;
  int carry = 0;  // in 128-row tiles
  if (lane == 0) {
    p.padded_offsets[0] = 0;
  }
  for (int base = 0; base < p.num_experts; base += 32) {
    const int e = base + lane;
    int tiles = 0;
    if (e < p.num_experts) {
      const int64_t first = p.expert_offsets[e], last = p.expert_offsets[e + 1];
      if (first < 0 || last < first || last > p.rows) {
        report_device_error(p.error_flag, kGroupedGemmBadOffsets);
      }
      int64_t lo, hi;
      clamped_rows(p.expert_offsets, e, p.rows, lo, hi);
      tiles = static_cast<int>((hi - lo + kQuantBlock - 1) / kQuantBlock);
    }
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, tiles, d);
      tiles += lane >= d ? v : 0;
    }
    if (e < p.num_experts) {
      p.padded_offsets[e + 1] = (carry + tiles) * kQuantBlock;
    }
    carry += __shfl_sync(0xffffffffu, tiles, 31);
  }
}

// One block per (128-row tile of the padded layout, 128 channels). The tile is staged in shared
// memory in its input type (16-byte row loads, conflict-free), then thread (column j, half h)
// reduces 64 rows of its column, the halves meet in shared memory, and each thread writes its 64
// quantised rows as 4 x 16 bytes of the transposed row j.
template <typename T>
__global__ void __launch_bounds__(kTransposeThreads)
    quantize_fp8_transposed_kernel(const QuantizeTransposedParams p) {
  constexpr int kPitch = kQuantBlock + 16 / sizeof(T);  // one 16-byte vector of padding per row
  __shared__ __align__(16) T tile[kQuantBlock][kPitch];
  __shared__ float row_scale[kQuantBlock];
  __shared__ float half_amax[2][kQuantBlock];

  const int64_t t = blockIdx.x;  // tile of the padded layout
  const int total_tiles = p.padded_offsets[p.num_experts] / kQuantBlock;
  if (t >= total_tiles) {
    return;
  }
  // The expert holding tile t: the last e with padded[e] <= 128 t (it is not empty).
  int lo_e = 0, hi_e = p.num_experts - 1;
  while (lo_e < hi_e) {
    const int mid = (lo_e + hi_e + 1) / 2;
    if (p.padded_offsets[mid] <= t * kQuantBlock) {
      lo_e = mid;
    } else {
      hi_e = mid - 1;
    }
  }
  const int e = lo_e;
  const int64_t pad_first = p.padded_offsets[e];
  const int64_t pad_rows = p.padded_offsets[e + 1] - pad_first;
  const int64_t tile_in_expert = (t * kQuantBlock - pad_first) / kQuantBlock;
  int64_t first, last;
  clamped_rows(p.expert_offsets, e, p.rows, first, last);
  const int64_t src_row0 = first + tile_in_expert * kQuantBlock;
  const int valid_rows = static_cast<int>(min(int64_t(kQuantBlock), last - src_row0));
  const int col0 = blockIdx.y * kQuantBlock;
  const int scale_cols = p.channels / kQuantBlock;

  // Stage: 128 rows x 128 channels in 16-byte vectors; rows past the expert's end are zeros.
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kVecsPerRow = kQuantBlock / kVec;
  const T* x = static_cast<const T*>(p.x);
  for (int v = threadIdx.x; v < kQuantBlock * kVecsPerRow; v += kTransposeThreads) {
    const int r = v / kVecsPerRow, c = (v % kVecsPerRow) * kVec;
    uint4 data = make_uint4(0, 0, 0, 0);
    if (r < valid_rows) {
      data = *reinterpret_cast<const uint4*>(x + (src_row0 + r) * p.channels + col0 + c);
    }
    *reinterpret_cast<uint4*>(&tile[r][c]) = data;
  }
  if (p.x_scales != nullptr && threadIdx.x < kQuantBlock) {
    const int r = threadIdx.x;
    row_scale[r] = r < valid_rows ? p.x_scales[(src_row0 + r) * scale_cols + blockIdx.y] : 0.0f;
  }
  __syncthreads();

  const int j = threadIdx.x % kQuantBlock, half = threadIdx.x / kQuantBlock;
  constexpr int kHalfRows = kQuantBlock / 2;
  float vals[kHalfRows];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kHalfRows; ++i) {
    const int r = half * kHalfRows + i;
    float v;
    if constexpr (sizeof(T) == 1) {
      v = dequantize_pair(static_cast<__nv_fp8x2_storage_t>(tile[r][j]), row_scale[r]).x;
    } else {
      v = to_float(tile[r][j]);
    }
    vals[i] = v;
    amax = fmaxf(amax, finite_abs(v));
  }
  half_amax[half][j] = amax;
  __syncthreads();
  const float scale = fp8_scale(fmaxf(half_amax[0][j], half_amax[1][j]), p.pow2_scale);
  const float inv_scale = fp8_inverse_scale(scale);

  __nv_fp8_storage_t* q_row =
      p.q + int64_t(p.channels) * pad_first + int64_t(col0 + j) * pad_rows + tile_in_expert * kQuantBlock;
#pragma unroll
  for (int chunk = 0; chunk < kHalfRows / 16; ++chunk) {
    __align__(16) __nv_fp8x2_storage_t out[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      out[i] = quantize_pair(vals[chunk * 16 + 2 * i], vals[chunk * 16 + 2 * i + 1], inv_scale);
    }
    *reinterpret_cast<uint4*>(q_row + half * kHalfRows + chunk * 16) = *reinterpret_cast<uint4*>(out);
  }
  if (half == 0) {
    p.scales[int64_t(p.channels) * (pad_first / kQuantBlock) + tile_in_expert * p.channels + col0 + j] =
        scale;
  }
}

// Capacity of the padded layout in rows: every expert may add up to 127 rows of padding.
inline int64_t transposed_capacity(int64_t rows, int num_experts) {
  return (rows / kQuantBlock + num_experts) * kQuantBlock;
}

template <typename T>
cudaError_t launch_quantize_fp8_transposed(const QuantizeTransposedParams& p, cudaStream_t stream) {
  padded_offsets_kernel<<<1, 32, 0, stream>>>(p);
  const int64_t tiles = transposed_capacity(p.rows, p.num_experts) / kQuantBlock;
  if (tiles > 0) {
    const dim3 grid(static_cast<unsigned>(tiles), p.channels / kQuantBlock);
    quantize_fp8_transposed_kernel<T><<<grid, kTransposeThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace moe_kernels
