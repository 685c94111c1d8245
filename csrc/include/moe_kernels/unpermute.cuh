// Unpermute (weighted combine) and its backward, framework-free.
//
//   out[t] = sum over k, in k order, of w[t, k] * y[row_map[t, k]]   (fp32, then + shared[t])
//
// Products and sums are separate fp32 roundings (__fmul_rn / __fadd_rn are never contracted into
// FMAs), so the result matches moe_kernels.reference.unpermute bit for bit. Without weights, w = 1
// (x * 1 is exact). Pairs with row -1 are skipped: their rows are never read.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "moe_kernels/bulk_copy.cuh"
#include "moe_kernels/device_error.cuh"
#include "moe_kernels/env.h"
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

// A (token, k) pair's row of y (-1: skipped) and weight. A row past y is skipped and flagged
// rather than read out of bounds.
struct UnpermutePair {
  int row;
  float weight;
};

template <typename T, typename W>
__device__ __forceinline__ UnpermutePair unpermute_pair(const UnpermuteParams<T, W>& p, int64_t token,
                                                        int k) {
  const int64_t index = token * p.top_k + k;
  int row = p.row_map[index];
  if (row >= p.y_rows) {
    report_device_error(p.error_flag, kUnpermuteRowOutOfRange);
    row = -1;
  }
  return {row, p.weights != nullptr ? to_float(p.weights[index]) : 1.0f};
}

// Loads the token's rows and weights into shared memory (threads < K).
template <typename T, typename W>
__device__ __forceinline__ void unpermute_load_pairs(const UnpermuteParams<T, W>& p, int64_t token, int* rows,
                                                     float* weights) {
  if (threadIdx.x < p.top_k) {
    const UnpermutePair pair = unpermute_pair(p, token, threadIdx.x);
    rows[threadIdx.x] = pair.row;
    weights[threadIdx.x] = pair.weight;
  }
  __syncthreads();
}

// out[token] vector i = acc (the K weighted rows, summed in k order) + shared[token], rounded once.
template <typename T, typename W>
__device__ __forceinline__ void unpermute_store(const UnpermuteParams<T, W>& p, int64_t token, int64_t i,
                                                float (&acc)[Vec16<T>::kSize]) {
  constexpr int kElems = Vec16<T>::kSize;
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
  unpermute_store(p, token, i, acc);
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

// ---------------------------------------------------------------------------------------------
// The bulk-copy path (top_k <= kBulkMaxTopK). A work item is one piece of one token's output row
// (rows split into equal pieces of at most 4 KB, one 16-byte vector per thread): the K rows' pieces
// are brought into shared memory by cp.async.bulk (one instruction per row piece, issued by warp 0
// lane k for pair k), then each thread sums one vector over the K rows in k order. Persistent blocks
// keep `stages` items in flight, so an SM has up to ~200 KB of reads outstanding with few
// instructions, which the register-fed kernel above cannot reach. Warp 0 loads the row ids and
// weights of the next item it will issue one item ahead, so their load latency is off the path
// from a freed stage to its refill.
// ---------------------------------------------------------------------------------------------
constexpr int kBulkMaxThreads = 256;
constexpr int kBulkMaxPieceBytes = kBulkMaxThreads * 16;
constexpr int kBulkMaxTopK = 8;
constexpr int kBulkMaxStages = 8;
// The stages' shared-memory budget per block: two stages at K = 8, three blocks per SM. More blocks
// beat deeper pipelines (H200, DeepSeek-V3 T = 32768: 64 KB 101% of copy, 96 KB 78%, 112 KB 85%).
// MOE_KERNELS_UNPERMUTE_SMEM_KB overrides it (tuning only; two stages of the largest K always fit).
constexpr int kBulkSmemBytes = 64 * 1024;
constexpr int kBulkMinSmemBytes = 2 * kBulkMaxTopK * kBulkMaxPieceBytes;
constexpr int kBulkMaxSmemBytes = 200 * 1024;
static_assert(kBulkSmemBytes >= kBulkMinSmemBytes, "at least two stages at the largest K");

inline int bulk_smem_budget() {
  static const int budget = [] {
    const int kb = env_int("MOE_KERNELS_UNPERMUTE_SMEM_KB", 0);
    return kb > 0 ? std::clamp(kb * 1024, kBulkMinSmemBytes, kBulkMaxSmemBytes) : kBulkSmemBytes;
  }();
  return budget;
}

struct BulkLayout {
  int pieces;       // per row
  int piece_bytes;  // a multiple of 16; the last piece of a row may be shorter
  int threads;      // one per 16-byte vector of a piece, rounded up to whole warps
  int stages;
  int stage_bytes;  // top_k pieces
  size_t smem_bytes() const { return size_t(stages) * stage_bytes; }
};

inline BulkLayout bulk_layout(int64_t row_vecs, int top_k) {
  BulkLayout l{};
  l.pieces = static_cast<int>((row_vecs * 16 + kBulkMaxPieceBytes - 1) / kBulkMaxPieceBytes);
  const int piece_vecs = static_cast<int>((row_vecs + l.pieces - 1) / l.pieces);
  l.piece_bytes = piece_vecs * 16;
  l.threads = (piece_vecs + 31) / 32 * 32;
  l.stage_bytes = top_k * l.piece_bytes;
  l.stages = std::min(kBulkMaxStages, bulk_smem_budget() / l.stage_bytes);
  return l;
}

template <typename T, typename W>
__global__ void __launch_bounds__(kBulkMaxThreads)
    unpermute_bulk_kernel(UnpermuteParams<T, W> p, int64_t tokens, BulkLayout layout) {
  extern __shared__ __align__(128) uint8_t pieces_smem[];
  __shared__ uint64_t full[kBulkMaxStages];
  __shared__ int rows[kBulkMaxStages][kBulkMaxTopK];
  __shared__ float weights[kBulkMaxStages][kBulkMaxTopK];
  constexpr int kElems = Vec16<T>::kSize;
  const int64_t row_bytes = p.row_vecs * 16;
  const int64_t items = tokens * layout.pieces;
  if (threadIdx.x == 0) {
    for (int s = 0; s < layout.stages; ++s) {
      bulk::mbarrier_init(&full[s]);
    }
    bulk::fence_barrier_init();
  }
  __syncthreads();

  // Warp 0: lane k's pair of an item's token (lanes >= K: none).
  auto lane_pair = [&](int64_t item) {
    return threadIdx.x < p.top_k ? unpermute_pair(p, item / layout.pieces, threadIdx.x)
                                 : UnpermutePair{-1, 0.0f};
  };
  // Warp 0: lane k publishes its pair for the stage and starts the copy of its row piece.
  auto issue = [&](int64_t item, int stage, UnpermutePair pair) {
    const int lane = threadIdx.x;
    const int64_t offset = (item % layout.pieces) * int64_t(layout.piece_bytes);
    const uint32_t bytes = static_cast<uint32_t>(min(int64_t(layout.piece_bytes), row_bytes - offset));
    if (lane < p.top_k) {
      rows[stage][lane] = pair.row;
      weights[stage][lane] = pair.weight;
    }
    const int copies = __popc(__ballot_sync(0xffffffffu, pair.row >= 0));
    if (lane == 0) {  // the rows and weights above are released to the consumers by this arrival
      bulk::mbarrier_arrive_expect_tx(&full[stage], copies * bytes);
    }
    __syncwarp();
    if (pair.row >= 0) {
      const char* src = reinterpret_cast<const char*>(p.y + pair.row * p.y_row_stride) + offset;
      bulk::copy_to_shared(pieces_smem + stage * layout.stage_bytes + lane * layout.piece_bytes, src, bytes,
                           &full[stage]);
    }
  };

  const int64_t step = gridDim.x;
  const int64_t lookahead = layout.stages * step;  // an item is refilled by the one this far on
  UnpermutePair next{-1, 0.0f};                    // warp 0: the pairs of the next refill
  if (threadIdx.x < 32) {
    for (int s = 0; s < layout.stages && blockIdx.x + s * step < items; ++s) {
      const int64_t item = blockIdx.x + s * step;
      issue(item, s, lane_pair(item));
    }
    if (blockIdx.x + lookahead < items) {
      next = lane_pair(blockIdx.x + lookahead);
    }
  }
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t item = blockIdx.x; item < items; item += step) {
    bulk::mbarrier_wait(&full[stage], phase);
    const int64_t token = item / layout.pieces;
    const int64_t vec = (item % layout.pieces) * (layout.piece_bytes / 16) + threadIdx.x;
    if (threadIdx.x * 16 < layout.piece_bytes && vec < p.row_vecs) {
      const uint8_t* stage_smem = pieces_smem + stage * layout.stage_bytes + threadIdx.x * 16;
      float acc[kElems] = {};
#pragma unroll
      for (int k = 0; k < kBulkMaxTopK; ++k) {
        if (k < p.top_k && rows[stage][k] >= 0) {
          const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(stage_smem + k * layout.piece_bytes);
          const float w = weights[stage][k];
#pragma unroll
          for (int c = 0; c < kElems; ++c) {
            acc[c] = __fadd_rn(acc[c], __fmul_rn(to_float(v.v[c]), w));
          }
        }
      }
      unpermute_store(p, token, vec, acc);
    }
    __syncthreads();  // the stage's pieces, rows and weights are free again
    const int64_t refill = item + lookahead;
    if (threadIdx.x < 32 && refill < items) {
      issue(refill, stage, next);
      if (refill + step < items) {
        next = lane_pair(refill + step);
      }
    }
    if (++stage == layout.stages) {
      stage = 0;
      phase ^= 1u;
    }
  }
}

// Blocks of the bulk kernel per SM for a layout on the current device. The shared-memory opt-in
// (once per device) and the occupancy query (once per device and layout: its threads and shared
// memory) are host calls of a few µs, kept off the launch path. `static`: the cache must belong to
// this module's kernel (see resident_units in fp8_grouped_sm90.cuh).
template <typename T, typename W>
static cudaError_t bulk_blocks_per_sm(const BulkLayout& layout, int& per_sm) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, size_t>, int> known;  // (device, threads, smem) -> blocks
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    return err;
  }
  const auto key = std::make_tuple(device, layout.threads, layout.smem_bytes());
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) {
    per_sm = it->second;
    return cudaSuccess;
  }
  auto* kernel = unpermute_bulk_kernel<T, W>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bulk_smem_budget());
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, layout.threads, layout.smem_bytes());
  }
  if (err == cudaSuccess) {
    per_sm = std::max(per_sm, 1);
    known.emplace(key, per_sm);
  }
  return err;
}

// Persistent grid: as many blocks as fit on the GPU (shared memory bounds it), never more than items.
template <typename T, typename W>
cudaError_t launch_unpermute_bulk(const UnpermuteParams<T, W>& p, int64_t tokens, int sm_count,
                                  cudaStream_t stream) {
  const BulkLayout layout = bulk_layout(p.row_vecs, p.top_k);
  int per_sm = 0;
  const cudaError_t err = bulk_blocks_per_sm<T, W>(layout, per_sm);
  if (err != cudaSuccess) {
    return err;
  }
  const int64_t grid = std::min<int64_t>(int64_t(per_sm) * sm_count, tokens * layout.pieces);
  unpermute_bulk_kernel<T, W>
      <<<static_cast<unsigned>(grid), layout.threads, layout.smem_bytes(), stream>>>(p, tokens, layout);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_unpermute(const UnpermuteParams<T, W>& p, int64_t tokens, int sm_count,
                             cudaStream_t stream) {
  if (p.top_k <= kBulkMaxTopK) {
    return launch_unpermute_bulk(p, tokens, sm_count, stream);
  }
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
