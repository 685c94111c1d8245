// Unpermute (weighted combine) and its backward, framework-free.
//
//   out[t] = sum over k, in k order, of w[t, k] * y[row_map[t, k]]   (fp32, then + shared[t])
//
// Products and sums are separate fp32 roundings (__fmul_rn / __fadd_rn are never contracted into
// FMAs), so the result matches moe_kernels.reference.unpermute bit for bit. Without weights, w = 1
// (x * 1 is exact). Pairs with row -1 are skipped: their rows are never read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe_kernels/device_error.cuh"
#include "moe_kernels/vec.cuh"

namespace moe_kernels {

constexpr int kUnpermuteMaxTopK = 32;
constexpr int kUnpermuteThreads = 128;
constexpr int kUnpermuteBatch = 8;  // rows loaded together, so 8 x 16 bytes per thread are in flight

template <typename T, typename W>
struct UnpermuteParams {
  const T* y;  // [y_rows, H] with row stride y_row_stride (elements)
  int64_t y_row_stride;
  int64_t y_rows;
  const int* row_map;  // [T, K]
  const W* weights;    // [T, K] or null
  const T* shared;     // [T, H] with row stride shared_row_stride, or null
  int64_t shared_row_stride;
  T* out;            // [T, H] contiguous
  int64_t row_vecs;  // 16-byte vectors per row
  int top_k;
  int* error_flag;
};

// Loads the token's rows and weights into shared memory (threads < K). Rows past y are skipped
// and flagged rather than read out of bounds.
template <typename T, typename W>
__device__ __forceinline__ void unpermute_load_pairs(const UnpermuteParams<T, W>& p, int64_t token, int* rows,
                                                     float* weights) {
  if (threadIdx.x < p.top_k) {
    const int64_t pair = token * p.top_k + threadIdx.x;
    int row = p.row_map[pair];
    if (row >= p.y_rows) {
      report_device_error(p.error_flag, kUnpermuteRowOutOfRange);
      row = -1;
    }
    rows[threadIdx.x] = row;
    weights[threadIdx.x] = p.weights != nullptr ? to_float(p.weights[pair]) : 1.0f;
  }
  __syncthreads();
}

// out[token] vector i: the K rows' vectors loaded kUnpermuteBatch at a time, summed in k order.
template <typename T, typename W>
__device__ __forceinline__ void unpermute_vector(const UnpermuteParams<T, W>& p, int64_t token, int64_t i,
                                                 const int* rows, const float* weights) {
  constexpr int kElems = Vec16<T>::kSize;
  float acc[kElems] = {};
  for (int k0 = 0; k0 < p.top_k; k0 += kUnpermuteBatch) {
    Vec16<T> v[kUnpermuteBatch];
#pragma unroll
    for (int j = 0; j < kUnpermuteBatch; ++j) {
      const int k = k0 + j;
      if (k < p.top_k && rows[k] >= 0) {
        v[j] = reinterpret_cast<const Vec16<T>*>(p.y + rows[k] * p.y_row_stride)[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kUnpermuteBatch; ++j) {
      const int k = k0 + j;
      if (k < p.top_k && rows[k] >= 0) {
#pragma unroll
        for (int c = 0; c < kElems; ++c) {
          acc[c] = __fadd_rn(acc[c], __fmul_rn(to_float(v[j].v[c]), weights[k]));
        }
      }
    }
  }
  if (p.shared != nullptr) {
    const Vec16<T> s = reinterpret_cast<const Vec16<T>*>(p.shared + token * p.shared_row_stride)[i];
#pragma unroll
    for (int c = 0; c < kElems; ++c) {
      acc[c] = __fadd_rn(acc[c], to_float(s.v[c]));
    }
  }
  Vec16<T> result;
#pragma unroll
  for (int c = 0; c < kElems; ++c) {
    result.v[c] = from_float<T>(acc[c]);
  }
  reinterpret_cast<Vec16<T>*>(p.out + token * p.row_vecs * kElems)[i] = result;
}

// One block per token: its pairs are loaded once, then each thread walks the row's 16-byte vectors
// with kUnpermuteBatch row loads in flight. The register cap keeps 8 blocks (32 warps) per SM.
template <typename T, typename W>
__global__ void __launch_bounds__(kUnpermuteThreads, 8) unpermute_kernel(UnpermuteParams<T, W> p) {
  __shared__ int rows[kUnpermuteMaxTopK];
  __shared__ float weights[kUnpermuteMaxTopK];
  const int64_t token = blockIdx.x;
  unpermute_load_pairs(p, token, rows, weights);
  // Blocks start at different chunks of the row, so the blocks in flight do not all read the same
  // column offsets of their rows at once (rows are a multiple of 2 KB apart: same DRAM channels).
  const int chunks = static_cast<int>((p.row_vecs + blockDim.x - 1) / blockDim.x);
  int chunk = static_cast<int>(token % chunks);
  for (int c = 0; c < chunks; ++c, chunk = chunk + 1 == chunks ? 0 : chunk + 1) {
    const int64_t i = int64_t(chunk) * blockDim.x + threadIdx.x;
    if (i < p.row_vecs) {
      unpermute_vector(p, token, i, rows, weights);
    }
  }
}

template <typename T, typename W>
cudaError_t launch_unpermute(const UnpermuteParams<T, W>& p, int64_t tokens, cudaStream_t stream) {
  unpermute_kernel<T, W><<<static_cast<unsigned>(tokens), kUnpermuteThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Backward of unpermute. grad_y must be zero-filled by the caller; for each valid pair (t, k):
//   grad_y[row_map[t, k]] = w[t, k] * grad_out[t]                      (fp32 product, rounded to T)
//   grad_w[t, k]          = dot(y[row_map[t, k]], grad_out[t]) in fp32  (0 for dropped pairs)
// One block per token walks the whole row, so the dot products reduce in a fixed order
// (deterministic). grad_w is computed only when y is given.
// ---------------------------------------------------------------------------------------------
template <typename T, typename W>
struct UnpermuteBackwardParams {
  UnpermuteParams<T, W> fwd;  // y (may be null), row_map, weights, row_vecs, top_k, error_flag
  const T* grad_out;          // [T, H] with row stride grad_out_row_stride
  int64_t grad_out_row_stride;
  T* grad_y;            // [y_rows, H] contiguous, zero-filled
  float* grad_weights;  // [T, K] or null
};

constexpr int kUnpermuteBackwardThreads = 256;

template <typename T, typename W>
__global__ void __launch_bounds__(kUnpermuteBackwardThreads)
    unpermute_backward_kernel(UnpermuteBackwardParams<T, W> p) {
  constexpr int kElems = Vec16<T>::kSize;
  constexpr int kWarps = kUnpermuteBackwardThreads / 32;
  __shared__ int rows[kUnpermuteMaxTopK];
  __shared__ float weights[kUnpermuteMaxTopK];
  __shared__ float warp_dots[kWarps][kUnpermuteMaxTopK];
  const UnpermuteParams<T, W>& f = p.fwd;
  const int64_t token = blockIdx.x;
  unpermute_load_pairs(f, token, rows, weights);
  const bool want_dots = p.grad_weights != nullptr;
  float dot[kUnpermuteMaxTopK] = {};  // indices are compile-time after unrolling: registers
  for (int64_t i = threadIdx.x; i < f.row_vecs; i += blockDim.x) {
    const Vec16<T> g = reinterpret_cast<const Vec16<T>*>(p.grad_out + token * p.grad_out_row_stride)[i];
#pragma unroll
    for (int k = 0; k < kUnpermuteMaxTopK; ++k) {
      if (k >= f.top_k) {
        break;
      }
      const int row = rows[k];
      if (row < 0) {
        continue;
      }
      Vec16<T> grad_row;
#pragma unroll
      for (int c = 0; c < kElems; ++c) {
        grad_row.v[c] = from_float<T>(__fmul_rn(to_float(g.v[c]), weights[k]));
      }
      reinterpret_cast<Vec16<T>*>(p.grad_y + row * f.row_vecs * kElems)[i] = grad_row;
      if (want_dots) {
        const Vec16<T> y = reinterpret_cast<const Vec16<T>*>(f.y + row * f.y_row_stride)[i];
#pragma unroll
        for (int c = 0; c < kElems; ++c) {
          dot[k] = __fadd_rn(dot[k], __fmul_rn(to_float(y.v[c]), to_float(g.v[c])));
        }
      }
    }
  }
  if (!want_dots) {
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kUnpermuteMaxTopK; ++k) {
    if (k >= f.top_k) {
      break;
    }
    float d = dot[k];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      d = __fadd_rn(d, __shfl_xor_sync(0xffffffffu, d, offset));
    }
    if (lane == 0) {
      warp_dots[warp][k] = d;
    }
  }
  __syncthreads();
  if (threadIdx.x < f.top_k) {
    float sum = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
      sum = __fadd_rn(sum, warp_dots[w][threadIdx.x]);
    }
    p.grad_weights[token * f.top_k + threadIdx.x] = rows[threadIdx.x] >= 0 ? sum : 0.0f;
  }
}

template <typename T, typename W>
cudaError_t launch_unpermute_backward(const UnpermuteBackwardParams<T, W>& p, int64_t tokens,
                                      cudaStream_t stream) {
  unpermute_backward_kernel<T, W><<<static_cast<unsigned>(tokens), kUnpermuteBackwardThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moe_kernels
