// Permute: group the rows of the (token, k) pairs by local expert (DESIGN.md §3), framework-free.
//
// Four kernels, sized only from host-known T, K, E and R (no host sync, CUDA-graph capturable) and
// deterministic (no atomic decides an order):
//   1. count:  per chunk of pairs, how many pairs go to each local expert (and flag bad ids);
//   2. scan:   one block turns the [chunk][expert] counts into each chunk's first row per expert and
//              the expert offsets, each expert padded to `align` (with few chunks, every rank block
//              does this itself instead: fused_chunk_first_rows);
//   3. rank:   per chunk, each pair's row = its chunk's first row for its expert + the number of
//              earlier pairs of the chunk with the same expert (stable: warp match + prefix popcount
//              in pair order), written to row_map (-1: dropped, or past num_out_rows);
//   4. copy:   token-major: each token row is read once (16-byte vectors), optionally quantised to
//              FP8 once, and written to each of its destination rows; extra blocks zero the padding.
// Rows at or past expert_offsets[-1] are left unwritten.
// Kernels 2-4 are launched with programmatic dependent launch (pdl.cuh): each starts while its
// predecessor runs and waits for it only where it reads its outputs, so the chain's launch gaps and
// the copy's loads of its first tokens' rows overlap the index kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe_kernels/device_error.cuh"
#include "moe_kernels/fp8.cuh"
#include "moe_kernels/pdl.cuh"
#include "moe_kernels/vec.cuh"

namespace moe_kernels {

constexpr int kPermuteMaxTopK = 32;            // one warp reads a token's destinations
constexpr int kPermuteMaxLocalExperts = 1024;  // per-warp expert counters live in shared memory
constexpr int kPermuteIndexThreads = 256;      // threads of the count and rank blocks
constexpr int kPermuteIndexWarps = kPermuteIndexThreads / 32;
// Pairs per counting / ranking block: kRounds pairs per thread. Large chunks keep the scan short at
// large T; small ones give the count and rank kernels 4x the blocks (and a quarter of the serial
// rounds per thread) where there would be few chunks, at T * K <= kPermuteSmallChunkMaxPairs.
constexpr int kPermuteChunkRounds = 16;
constexpr int kPermuteSmallChunkRounds = 4;
constexpr int kPermuteChunkPairs = kPermuteChunkRounds * kPermuteIndexThreads;
constexpr int kPermuteSmallChunkPairs = kPermuteSmallChunkRounds * kPermuteIndexThreads;
constexpr int64_t kPermuteSmallChunkMaxPairs = 16 * int64_t(kPermuteChunkPairs);
constexpr int kPermuteScanThreads = 1024;
constexpr int kPermuteCopyMaxThreads = 256;
constexpr int kPermutePadRowsPerBlock = 16;         // padding rows zeroed per block
constexpr int kFp8VecsPerGroup = kQuantBlock / 16;  // 16-byte vectors of e4m3 per 1x128 scale

__device__ __forceinline__ unsigned lanemask_lt() {
  return (1u << (threadIdx.x % 32)) - 1u;
}

// Everything the index kernels (count, scan, rank) share. Rows fit in int32 (checked on the host).
struct PermuteIndexParams {
  int64_t num_pairs;    // T * K
  int pairs_per_chunk;  // whole tokens: (chunk pairs / K) * K, chunk pairs = kRounds * threads
  int num_chunks;
  int num_experts;  // ids must lie in [-1, num_experts)
  int first_expert;
  int num_local;  // local experts [first_expert, first_expert + num_local)
  int align;
  int num_out_rows;
  int* chunk_rows;      // [num_chunks, num_local] counts, then each chunk's first row per expert
  int* expert_start;    // [num_local + 1] unclamped padded offsets
  int* expert_count;    // [num_local] pairs per expert
  int* expert_offsets;  // out: [num_local + 1], clamped to num_out_rows
  int* row_map;         // out: [T * K]
  int* error_flag;
};

// Local expert of an id, or -1 when the pair is dropped (-1, another rank's expert, out of range).
// Ids outside [-1, num_experts) set `bad`.
template <typename IdT>
__device__ __forceinline__ int local_expert(IdT id, const PermuteIndexParams& p, bool& bad) {
  const int64_t v = static_cast<int64_t>(id);
  bad |= v < -1 || v >= p.num_experts;
  const int64_t local = v - p.first_expert;
  return v >= 0 && local >= 0 && local < p.num_local ? static_cast<int>(local) : -1;
}

// The count and rank kernels map pairs to threads the same way: warp w of a chunk's block owns the
// kRounds * 32 consecutive pairs from w * kRounds * 32, lane l pair r * 32 + l of them. All of a
// thread's ids are loaded first, so they are in flight together.
struct ChunkPairs {
  int64_t begin;  // first pair of the chunk
  int count;      // pairs in the chunk
  int first;      // index in the chunk of this thread's round-0 pair
};

template <int kRounds>
__device__ __forceinline__ ChunkPairs chunk_pairs(const PermuteIndexParams& p) {
  const int64_t begin = blockIdx.x * int64_t(p.pairs_per_chunk);
  const int count = static_cast<int>(min(int64_t(p.pairs_per_chunk), p.num_pairs - begin));
  return {begin, count, static_cast<int>(threadIdx.x / 32 * kRounds * 32 + threadIdx.x % 32)};
}

template <int kRounds, typename IdT>
__device__ __forceinline__ void load_chunk_ids(const IdT* __restrict__ ids, const ChunkPairs& c,
                                               IdT (&id)[kRounds]) {
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int j = c.first + r * 32;
    id[r] = j < c.count ? ids[c.begin + j] : IdT(-1);
  }
}

// 1. Per-chunk expert counts. Lanes with the same expert add once (warp match), so a chunk routed
// to a single expert does not serialise on one shared-memory counter.
template <int kRounds, typename IdT>
__global__ void __launch_bounds__(kPermuteIndexThreads)
    permute_count_kernel(PermuteIndexParams p, const IdT* __restrict__ ids) {
  __shared__ int counts[kPermuteMaxLocalExperts];
  pdl_launch_dependents();  // the scan may start; it waits for these counts
  const ChunkPairs chunk = chunk_pairs<kRounds>(p);
  IdT id[kRounds];
  load_chunk_ids<kRounds>(ids, chunk, id);
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    counts[e] = 0;
  }
  __syncthreads();
  bool bad = false;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int e = local_expert(id[r], p, bad);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && threadIdx.x % 32 == __ffs(peers) - 1) {
      atomicAdd(&counts[e], __popc(peers));
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) {
    report_device_error(p.error_flag, kPermuteExpertIdOutOfRange);
  }
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    p.chunk_rows[blockIdx.x * p.num_local + e] = counts[e];
  }
}

// Exclusive prefix sum over a block of kWarps warps (at most 32); `total` gets the sum of all.
// warp_sums holds kWarps ints.
template <int kWarps = kPermuteScanThreads / 32>
__device__ __forceinline__ int block_exclusive_sum(int x, int* warp_sums, int& total) {
  static_assert(kWarps >= 1 && kWarps <= 32);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, offset);
    inclusive += lane >= offset ? y : 0;
  }
  if (lane == 31) {
    warp_sums[warp] = inclusive;
  }
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarps; offset *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, w, offset);
      w += lane >= offset ? y : 0;
    }
    if (lane < kWarps) {
      warp_sums[lane] = w;  // inclusive over warps
    }
  }
  __syncthreads();
  total = warp_sums[kWarps - 1];
  return (warp == 0 ? 0 : warp_sums[warp - 1]) + inclusive - x;
}

// Counts of expert e in chunks [c, c + kBatch) below `end` (0 past it), loaded together.
constexpr int kScanBatch = 8;

template <int kBatch>
__device__ __forceinline__ void load_counts(const PermuteIndexParams& p, int c, int end, int e,
                                            int (&count)[kBatch]) {
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    count[b] = c + b < end ? p.chunk_rows[(c + b) * p.num_local + e] : 0;
  }
}

__device__ __forceinline__ int align_rows(int rows, int align) {
  return (rows + align - 1) / align * align;
}

// What the scan hands on: expert e's padded first row and pair count (the copy kernels' padding
// bounds and the caller's offsets, clamped to num_out_rows), and the end of the last expert, with
// the overflow report when it passes num_out_rows.
__device__ __forceinline__ void publish_expert(const PermuteIndexParams& p, int e, int start, int count) {
  p.expert_start[e] = start;
  p.expert_count[e] = count;
  p.expert_offsets[e] = min(start, p.num_out_rows);
}

__device__ __forceinline__ void publish_all_rows(const PermuteIndexParams& p, int all_rows) {
  p.expert_start[p.num_local] = all_rows;
  p.expert_offsets[p.num_local] = min(all_rows, p.num_out_rows);
  if (all_rows > p.num_out_rows) {
    report_device_error(p.error_flag, kPermuteRowsOverflow);
  }
}

// 2. One block: per expert, the exclusive sum of its counts over chunks (each thread sums a slice of
// chunks, so few chunks or few experts still use the whole block), the padded expert offsets, and
// each chunk's first row per expert (in place over the counts).
static __global__ void __launch_bounds__(kPermuteScanThreads) permute_scan_kernel(PermuteIndexParams p) {
  static_assert(kPermuteScanThreads == 32 * 32 && kPermuteScanThreads >= kPermuteMaxLocalExperts);
  __shared__ int slice_rows[kPermuteScanThreads];  // [slice][expert]: slice sums, then slice bases
  __shared__ int expert_start[kPermuteMaxLocalExperts];
  __shared__ int warp_sums[32];
  const int num_local = p.num_local;
  const int slices = max(1, min(kPermuteScanThreads / num_local, p.num_chunks));
  const int chunks_per_slice = (p.num_chunks + slices - 1) / slices;
  const int e = threadIdx.x % num_local, slice = threadIdx.x / num_local;
  const bool active = slice < slices;
  const int chunk_begin = slice * chunks_per_slice;
  const int chunk_end = min(p.num_chunks, chunk_begin + chunks_per_slice);
  pdl_launch_dependents();  // the rank kernel may start its chunk-local work
  pdl_wait();               // the count kernel's counts

  if (active) {
    int sum = 0;
    for (int c = chunk_begin; c < chunk_end; c += kScanBatch) {
      int count[kScanBatch];
      load_counts(p, c, chunk_end, e, count);
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) {
        sum += count[b];
      }
    }
    slice_rows[slice * num_local + e] = sum;
  }
  __syncthreads();
  int total = 0;
  if (threadIdx.x < num_local) {
    for (int s = 0; s < slices; ++s) {
      const int count = slice_rows[s * num_local + threadIdx.x];
      slice_rows[s * num_local + threadIdx.x] = total;
      total += count;
    }
  }
  int all_rows = 0;
  const int start =
      block_exclusive_sum(threadIdx.x < num_local ? align_rows(total, p.align) : 0, warp_sums, all_rows);
  if (threadIdx.x < num_local) {
    expert_start[threadIdx.x] = start;
    publish_expert(p, threadIdx.x, start, total);
  }
  if (threadIdx.x == 0) {
    publish_all_rows(p, all_rows);
  }
  __syncthreads();
  if (active) {
    int row = expert_start[e] + slice_rows[slice * num_local + e];
    for (int c = chunk_begin; c < chunk_end; c += kScanBatch) {
      int count[kScanBatch];
      load_counts(p, c, chunk_end, e, count);
#pragma unroll
      for (int b = 0; b < kScanBatch && c + b < chunk_end; ++b) {
        p.chunk_rows[(c + b) * num_local + e] = row;
        row += count[b];
      }
    }
  }
}

// 2'. The scan, done by every rank block itself on the small-chunk path (T * K <=
// kPermuteSmallChunkMaxPairs, so about 64 chunks at most): the block reads every chunk's counts
// (num_chunks * num_local ints, from L2) rather than waiting for the one-block scan kernel, which at
// T * K = 32768 put about 3 us between the count and rank kernels. Fills first_row[e] = this chunk's
// first row for expert e; block 0 also writes the expert offsets, starts and counts (the values of
// permute_scan_kernel) and reports a row overflow.
constexpr int kFusedScanBatch = 16;  // counts loaded together (one L2 round trip per batch)
constexpr int kExpertsPerScanThread = kPermuteMaxLocalExperts / kPermuteIndexThreads;

__device__ __forceinline__ void fused_chunk_first_rows(const PermuteIndexParams& p, int* first_row) {
  __shared__ int expert_rows[kPermuteMaxLocalExperts];  // pairs per expert over all chunks
  __shared__ int warp_sums[kPermuteIndexWarps];
  const int num_local = p.num_local;
  for (int e = threadIdx.x; e < num_local; e += blockDim.x) {
    int before = 0, total = 0;
    for (int c = 0; c < p.num_chunks; c += kFusedScanBatch) {
      int count[kFusedScanBatch];
      load_counts(p, c, p.num_chunks, e, count);
#pragma unroll
      for (int b = 0; b < kFusedScanBatch; ++b) {
        total += count[b];
        before += c + b < static_cast<int>(blockIdx.x) ? count[b] : 0;
      }
    }
    first_row[e] = before;
    expert_rows[e] = total;
  }
  __syncthreads();
  // Padded starts: kExpertsPerScanThread consecutive experts per thread, the threads' sums scanned
  // over the block.
  const int first = threadIdx.x * kExpertsPerScanThread;
  int mine = 0;
#pragma unroll
  for (int j = 0; j < kExpertsPerScanThread; ++j) {
    mine += first + j < num_local ? align_rows(expert_rows[first + j], p.align) : 0;
  }
  int all_rows = 0;
  int start = block_exclusive_sum<kPermuteIndexWarps>(mine, warp_sums, all_rows);
#pragma unroll
  for (int j = 0; j < kExpertsPerScanThread; ++j) {
    const int e = first + j;
    if (e < num_local) {
      first_row[e] += start;
      if (blockIdx.x == 0) {
        publish_expert(p, e, start, expert_rows[e]);
      }
      start += align_rows(expert_rows[e], p.align);
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    publish_all_rows(p, all_rows);
  }
  __syncthreads();
}

// 3. Rows of the pairs of a chunk. Each warp ranks a contiguous run of the chunk's pairs, 32 at a
// time in pair order, against its own per-expert counters; the warps' counters are then scanned in
// warp order from the chunk's first rows, so a pair's row only depends on the pairs before it.
// On the small-chunk path the chunks' first rows come from fused_chunk_first_rows, right after the
// count kernel, instead of from permute_scan_kernel.
template <int kRounds, typename IdT>
__global__ void __launch_bounds__(kPermuteIndexThreads)
    permute_rank_kernel(PermuteIndexParams p, const IdT* __restrict__ ids) {
  __shared__ int warp_rows[kPermuteIndexWarps * kPermuteMaxLocalExperts];  // [warp][expert]
  const int num_local = p.num_local;
  for (int i = threadIdx.x; i < kPermuteIndexWarps * num_local; i += blockDim.x) {
    warp_rows[i] = 0;
  }
  pdl_launch_dependents();  // the copy may start loading its first token rows
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const ChunkPairs chunk = chunk_pairs<kRounds>(p);
  IdT id[kRounds];
  load_chunk_ids<kRounds>(ids, chunk, id);
  __syncthreads();  // counters zeroed

  int* counters = warp_rows + warp * num_local;
  int expert[kRounds], rank[kRounds];
  bool bad = false;  // reported by the count kernel
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int e = local_expert(id[r], p, bad);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int before = e >= 0 ? counters[e] : 0;
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) {
      counters[e] = before + __popc(peers);
    }
    __syncwarp();
    expert[r] = e;
    rank[r] = before + __popc(peers & lanemask_lt());
  }
  __syncthreads();
  pdl_wait();  // the scan's first rows per chunk and expert (fused: the count kernel's counts)
  constexpr bool kFusedScan = kRounds == kPermuteSmallChunkRounds;
  __shared__ int fused_first_row[kFusedScan ? kPermuteMaxLocalExperts : 1];
  if constexpr (kFusedScan) {
    fused_chunk_first_rows(p, fused_first_row);
  }
  for (int e = threadIdx.x; e < num_local; e += blockDim.x) {
    int row = kFusedScan ? fused_first_row[e] : p.chunk_rows[blockIdx.x * num_local + e];
    for (int w = 0; w < kPermuteIndexWarps; ++w) {
      const int count = warp_rows[w * num_local + e];
      warp_rows[w * num_local + e] = row;
      row += count;
    }
  }
  __syncthreads();
  bool overflow = false;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int j = chunk.first + r * 32;
    if (j < chunk.count) {
      int row = expert[r] >= 0 ? counters[expert[r]] + rank[r] : -1;
      if (row >= p.num_out_rows) {  // the pair does not fit: drop it rather than write past R
        row = -1;
        overflow = true;
      }
      p.row_map[chunk.begin + j] = row;
    }
  }
  if (__syncthreads_or(overflow) && threadIdx.x == 0) {
    report_device_error(p.error_flag, kPermuteRowsOverflow);
  }
}

// Pairs per chunk (whole tokens) for T * K pairs: see kPermuteSmallChunkPairs.
inline int permute_pairs_per_chunk(int64_t num_pairs, int top_k) {
  const int chunk = num_pairs <= kPermuteSmallChunkMaxPairs ? kPermuteSmallChunkPairs : kPermuteChunkPairs;
  return chunk / top_k * top_k;
}

template <int kRounds, typename IdT>
cudaError_t launch_permute_index_rounds(const PermuteIndexParams& p, const IdT* ids, cudaStream_t stream) {
  permute_count_kernel<kRounds, IdT><<<p.num_chunks, kPermuteIndexThreads, 0, stream>>>(p, ids);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && kRounds != kPermuteSmallChunkRounds) {  // else the rank blocks scan
    err = launch_pdl(permute_scan_kernel, 1, kPermuteScanThreads, 0, stream, true, p);
  }
  if (err == cudaSuccess) {
    err = launch_pdl(permute_rank_kernel<kRounds, IdT>, p.num_chunks, kPermuteIndexThreads, 0, stream, true,
                     p, ids);
  }
  return err;
}

// p.pairs_per_chunk must come from permute_pairs_per_chunk.
template <typename IdT>
cudaError_t launch_permute_index(const PermuteIndexParams& p, const IdT* ids, cudaStream_t stream) {
  return p.pairs_per_chunk <= kPermuteSmallChunkPairs
             ? launch_permute_index_rounds<kPermuteSmallChunkRounds>(p, ids, stream)
             : launch_permute_index_rounds<kPermuteChunkRounds>(p, ids, stream);
}

// ---------------------------------------------------------------------------------------------
// 4. Data movement. Grid: x = padding blocks first (so they overlap with the token blocks rather
// than trail them), then one block per token; y = column groups of a row. Each thread owns a few
// 16-byte output vectors of the row: vector u of thread i is i + u * blockDim within its group.
// ---------------------------------------------------------------------------------------------
struct PermuteCopyParams {
  const int* row_map;  // [T, K]
  int top_k;
  int64_t num_tokens;
  uint4* out;         // [R, row_vecs] 16-byte vectors
  float* out_scales;  // [R, groups] when the output is FP8, else null
  int64_t row_vecs;   // 16-byte output vectors per row
  int groups;         // 1x128 scales per row (FP8 output)
  // Padding: rows [expert_start[e] + expert_count[e], expert_start[e + 1]) below num_out_rows.
  const int* expert_start;
  const int* expert_count;
  int num_out_rows;
  int pad_blocks_per_expert;  // 0 when align == 1
  int num_pad_blocks;
  // Launched right after permute's index kernels (programmatic dependent launch): the kernel waits
  // for them before it reads the row map or the padding bounds. With early_x it also reads x before
  // that wait, since x was written before the index kernels (set when every expert is local, so
  // nearly every token has a destination and the early read is rarely wasted).
  bool after_index;
  bool early_x;
};

// Zeroes this block's share of one expert's padding rows (FP8: zero bytes with scale 1).
template <int kVecs>
__device__ void permute_zero_padding(const PermuteCopyParams& p, int64_t first_vec) {
  const int e = blockIdx.x / p.pad_blocks_per_expert;
  const int part = blockIdx.x % p.pad_blocks_per_expert;
  const int begin = min(p.expert_start[e] + p.expert_count[e], p.num_out_rows);
  const int end = min(p.expert_start[e + 1], p.num_out_rows);
  for (int row = begin + part * kPermutePadRowsPerBlock;
       row < min(end, begin + (part + 1) * kPermutePadRowsPerBlock); ++row) {
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int64_t i = first_vec + u * blockDim.x;
      if (i < p.row_vecs) {
        p.out[row * p.row_vecs + i] = make_uint4(0, 0, 0, 0);
        if (p.out_scales != nullptr && i % kFp8VecsPerGroup == 0) {
          p.out_scales[int64_t(row) * p.groups + i / kFp8VecsPerGroup] = 1.0f;
        }
      }
    }
  }
}

// The token's valid destination rows, compacted into shared memory by warp 0; returns how many.
__device__ __forceinline__ int permute_destinations(const PermuteCopyParams& p, int64_t token, int* dest) {
  __shared__ int num_dest;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int row = lane < p.top_k ? p.row_map[token * p.top_k + lane] : -1;
    const unsigned valid = __ballot_sync(0xffffffffu, row >= 0);
    if (row >= 0) {
      dest[__popc(valid & lanemask_lt())] = row;
    }
    if (lane == 0) {
      num_dest = __popc(valid);
    }
  }
  __syncthreads();
  return num_dest;
}

// The token's destinations, once the index kernels are done (see after_index), and its row loaded
// by load_x: before that wait with early_x, else only when the token has a destination.
template <typename LoadX>
__device__ __forceinline__ int permute_load_and_destinations(const PermuteCopyParams& p, int64_t token,
                                                             int* dest, LoadX&& load_x) {
  if (p.early_x) {
    load_x();
  }
  pdl_wait();
  const int num_dest = permute_destinations(p, token, dest);
  if (num_dest > 0 && !p.early_x) {
    load_x();
  }
  return num_dest;
}

// Rows of any element type (and FP8 rows with their scales) move as raw 16-byte vectors.
constexpr int kPermuteCopyVecs = 4;

template <bool kWithScales>
__global__ void __launch_bounds__(kPermuteCopyMaxThreads)
    permute_copy_kernel(PermuteCopyParams p, const uint4* __restrict__ x, int64_t x_row_stride_vecs,
                        const float* __restrict__ x_scales) {
  constexpr int kVecs = kPermuteCopyVecs;
  const int64_t first_vec = blockIdx.y * int64_t(blockDim.x) * kVecs + threadIdx.x;
  if (blockIdx.x < p.num_pad_blocks) {
    pdl_wait();  // the padding bounds
    permute_zero_padding<kVecs>(p, first_vec);
    return;
  }
  const int64_t token = blockIdx.x - p.num_pad_blocks;
  uint4 v[kVecs];
  float scale[kVecs];
  auto load_x = [&] {
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int64_t i = first_vec + u * blockDim.x;
      if (i < p.row_vecs) {
        v[u] = x[token * x_row_stride_vecs + i];
        if (kWithScales && i % kFp8VecsPerGroup == 0) {
          scale[u] = x_scales[token * p.groups + i / kFp8VecsPerGroup];
        }
      }
    }
  };
  __shared__ int dest[kPermuteMaxTopK];
  const int num_dest = permute_load_and_destinations(p, token, dest, load_x);
  if (num_dest == 0) {
    return;  // routed to no local expert
  }
  for (int d = 0; d < num_dest; ++d) {
    const int64_t row = dest[d];
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int64_t i = first_vec + u * blockDim.x;
      if (i < p.row_vecs) {
        p.out[row * p.row_vecs + i] = v[u];
        if (kWithScales && i % kFp8VecsPerGroup == 0) {
          p.out_scales[row * p.groups + i / kFp8VecsPerGroup] = scale[u];
        }
      }
    }
  }
}

// Fused 1x128 FP8 quantisation: each thread owns slots of 16 channels (one 16-byte e4m3 vector out),
// 8 consecutive lanes own a 128-channel group. The math is quantize_fp8's (fp8.cuh), bit for bit.
constexpr int kPermuteQuantSlots = 2;

template <typename T>
__global__ void __launch_bounds__(kPermuteCopyMaxThreads)
    permute_quantize_kernel(PermuteCopyParams p, const T* __restrict__ x, int64_t x_row_stride,
                            bool pow2_scale) {
  constexpr int kSlots = kPermuteQuantSlots;
  constexpr int kSlotChannels = 16;
  constexpr int kLoads = kSlotChannels / Vec16<T>::kSize;  // 16-byte loads per slot
  const int64_t first_vec = blockIdx.y * int64_t(blockDim.x) * kSlots + threadIdx.x;
  if (blockIdx.x < p.num_pad_blocks) {
    pdl_wait();  // the padding bounds
    permute_zero_padding<kSlots>(p, first_vec);
    return;
  }
  const int64_t token = blockIdx.x - p.num_pad_blocks;
  Vec16<T> in[kSlots][kLoads] = {};
  auto load_x = [&] {
#pragma unroll
    for (int u = 0; u < kSlots; ++u) {
      const int64_t i = first_vec + u * blockDim.x;
      if (i < p.row_vecs) {
        const Vec16<T>* src = reinterpret_cast<const Vec16<T>*>(x + token * x_row_stride + i * kSlotChannels);
#pragma unroll
        for (int l = 0; l < kLoads; ++l) {
          in[u][l] = src[l];
        }
      }
    }
  };
  __shared__ int dest[kPermuteMaxTopK];
  const int num_dest = permute_load_and_destinations(p, token, dest, load_x);
  if (num_dest == 0) {
    return;  // routed to no local expert
  }
  uint4 q[kSlots];
  float scale[kSlots];
#pragma unroll
  for (int u = 0; u < kSlots; ++u) {
    float v[kSlotChannels];
    float amax = 0.0f;
#pragma unroll
    for (int c = 0; c < kSlotChannels; ++c) {
      v[c] = to_float(in[u][c / Vec16<T>::kSize].v[c % Vec16<T>::kSize]);
      amax = fmaxf(amax, finite_abs(v[c]));
    }
    // All lanes shuffle (H % 128 == 0, so a group's 8 lanes are all in or all out of the row).
    amax = group_max<kFp8VecsPerGroup>(amax);
    scale[u] = fp8_scale(amax, pow2_scale);
    const float inv_scale = fp8_inverse_scale(scale[u]);
    __nv_fp8x2_storage_t* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&q[u]);
#pragma unroll
    for (int c = 0; c < kSlotChannels / 2; ++c) {
      pairs[c] = quantize_pair(v[2 * c], v[2 * c + 1], inv_scale);
    }
  }
  for (int d = 0; d < num_dest; ++d) {
    const int64_t row = dest[d];
#pragma unroll
    for (int u = 0; u < kSlots; ++u) {
      const int64_t i = first_vec + u * blockDim.x;
      if (i < p.row_vecs) {
        p.out[row * p.row_vecs + i] = q[u];
        if (i % kFp8VecsPerGroup == 0) {
          p.out_scales[row * p.groups + i / kFp8VecsPerGroup] = scale[u];
        }
      }
    }
  }
}

// Grid and block of the data-movement kernels: column groups of at most kPermuteCopyMaxThreads *
// vecs_per_thread vectors, split evenly, with a whole number of warps per block.
struct PermuteCopyLaunch {
  dim3 grid;
  int threads;
};

inline PermuteCopyLaunch permute_copy_launch(const PermuteCopyParams& p, int vecs_per_thread) {
  const int64_t capacity = int64_t(kPermuteCopyMaxThreads) * vecs_per_thread;
  const int64_t column_groups = (p.row_vecs + capacity - 1) / capacity;
  const int64_t per_group = (p.row_vecs + column_groups - 1) / column_groups;
  const int64_t threads = ((per_group + vecs_per_thread - 1) / vecs_per_thread + 31) / 32 * 32;
  return {dim3(static_cast<unsigned>(p.num_pad_blocks + p.num_tokens), static_cast<unsigned>(column_groups)),
          static_cast<int>(threads)};
}

inline cudaError_t launch_permute_copy(const PermuteCopyParams& p, const void* x, int64_t x_row_stride_bytes,
                                       const float* x_scales, cudaStream_t stream) {
  const PermuteCopyLaunch l = permute_copy_launch(p, kPermuteCopyVecs);
  const uint4* src = static_cast<const uint4*>(x);
  const int64_t stride = x_row_stride_bytes / 16;
  return x_scales != nullptr ? launch_pdl(permute_copy_kernel<true>, l.grid, l.threads, 0, stream,
                                          p.after_index, p, src, stride, x_scales)
                             : launch_pdl(permute_copy_kernel<false>, l.grid, l.threads, 0, stream,
                                          p.after_index, p, src, stride, nullptr);
}

template <typename T>
cudaError_t launch_permute_quantize(const PermuteCopyParams& p, const T* x, int64_t x_row_stride,
                                    bool pow2_scale, cudaStream_t stream) {
  const PermuteCopyLaunch l = permute_copy_launch(p, kPermuteQuantSlots);
  return launch_pdl(permute_quantize_kernel<T>, l.grid, l.threads, 0, stream, p.after_index, p, x,
                    x_row_stride, pow2_scale);
}

}  // namespace moe_kernels
