// Expert-parallel dispatch / combine: the local kernels on either side of the exchange,
// framework-free (../shared/ep-design.md §3).
//
// Source side (layout). A token goes to a rank once, however many of its K experts live there:
//   1. token ranks: each token's distinct destination ranks, ascending, padded with -1 ([T, K]).
//      permute() over these "rank ids" then gives each token's row in the rank-major send block
//      (dedup, in token order) and the rows per rank, and copies (or quantises) the rows there;
//      permute() over the expert ids with zero columns gives each pair's index among this source's
//      pairs of its expert (eidx) and the pairs per expert.
//   2. pack meta: beside each send row, K entries (local expert, eidx, gate weight) for the
//      token's experts on that rank, in k order, -1 padded; and the counts each rank is sent
//      ([W, 1 + L]: rows, then pairs per local expert of that rank).
// Receiver side (unpack):
//   3. unpack scan (one block): from the counts every source sent, the padded expert offsets and
//      base[s][l] = offsets[l] + pairs of expert l from sources before s.
//   4. unpack index: row (s, j)'s destination for each entry = base[s][l] + eidx; permute's copy
//      kernel then moves the rows (and FP8 scales) and zeroes the padding.
// So inside an expert, rows are ordered by (source rank, source pair): the permute of the
// rank-ordered concatenation of all ranks' tokens, bit for bit. Combine reuses unpermute twice.
// Everything is deterministic: atomics never decide a position. Kernels that are not templates are
// static: this header is included by the layout and the unpack launchers.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "moe_kernels/device_error.cuh"
#include "moe_kernels/permute.cuh"

namespace moe_kernels {
namespace ep {

constexpr int kMaxTopK = kPermuteMaxTopK;                  // meta entries per row
constexpr int kMaxLocalExperts = kPermuteMaxLocalExperts;  // the unpack scan's block
constexpr int kMaxRanks = kPermuteScanThreads - 1;         // the unpack scan's block also scans sources
constexpr int kThreads = 256;

// Meta of a send row: [3, K] int32 = local experts (-1 = unused), eidx, gate weights (fp32 bits).
constexpr int kMetaFields = 3;

constexpr int kTokensPerBlock = kThreads / 32;  // the layout kernels give each token a warp

// 1. A token's distinct destination ranks, ascending, -1 padded. One warp per token, lane k its
// pair k. Ids outside [-1, E) are dropped and reported.
template <typename IdT>
__global__ void __launch_bounds__(kThreads)
    token_ranks_kernel(const IdT* __restrict__ ids, int64_t num_tokens, int top_k, int num_experts,
                       const int* __restrict__ expert_rank, int* __restrict__ rank_ids, int* error_flag) {
  const int64_t t = blockIdx.x * int64_t(kTokensPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= num_tokens) {
    return;  // the whole warp
  }
  const bool pair = lane < top_k;
  const int64_t id = pair ? static_cast<int64_t>(ids[t * top_k + lane]) : -1;
  const bool valid = id >= 0 && id < num_experts;
  const int rank = valid ? expert_rank[id] : INT_MAX;
  // The first lane of each distinct rank places it, after the distinct ranks below it.
  const unsigned peers = __match_any_sync(0xffffffffu, rank);
  const bool first = valid && lane == __ffs(peers) - 1;
  const unsigned firsts = __ballot_sync(0xffffffffu, first);
  int position = 0;
  for (int l = 0; l < 32; ++l) {
    const int other = __shfl_sync(0xffffffffu, rank, l);
    position += ((firsts >> l) & 1u) && other < rank;
  }
  if (first) {
    rank_ids[t * top_k + position] = rank;
  }
  if (pair && lane >= __popc(firsts)) {
    rank_ids[t * top_k + lane] = -1;
  }
  if (pair && (id < -1 || id >= num_experts)) {
    report_device_error(error_flag, kEpExpertIdOutOfRange);
  }
}

struct PackMetaParams {
  int64_t num_tokens;
  int top_k;
  int num_experts;
  const int* expert_rank;     // [E]
  const int* expert_local;    // [E] index of the expert among its rank's experts
  const int* expert_row;      // [T, K] permute's row of each pair over all E experts (align 1)
  const int* expert_offsets;  // [E + 1] its offsets: row - offsets[e] = eidx
  const int* rank_ids;        // [T, K] from token_ranks
  const int* send_row;        // [T, K] permute's row of each (token, rank) in the packed send block
  const int* rank_offsets;    // [W + 1] its offsets: row - rank_offsets[r] = the token's slot for r
  int capacity;               // > 0: rank r's rows at r * capacity + slot (fixed sizes); 0: packed
  int num_send_rows;          // rows of meta
  int* meta;                  // out: [num_send_rows, 3, K]
  int* pair_slot;             // out: [T, K] send row * K + entry of each pair, -1 when dropped
  int* send_row_out;          // out: [T, K] the send row of (token, rank_ids[t, j]) in this layout
  int* error_flag;
};

// 2. One warp per token: lane k holds pair k (its rank, local expert, eidx, weight) and the
// token's j = k-th destination (rank_ids / send row). A pair's entry in its send row is the number
// of the token's earlier pairs on the same rank (warp match + prefix popcount).
template <typename IdT, typename WeightT>
__global__ void __launch_bounds__(kThreads)
    pack_meta_kernel(PackMetaParams p, const IdT* __restrict__ ids, const WeightT* __restrict__ weights) {
  const int64_t t = blockIdx.x * int64_t(kTokensPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= p.num_tokens) {
    return;  // the whole warp
  }
  const int K = p.top_k;
  const bool in = lane < K;
  const int64_t pair = t * K + lane;
  // This lane's destination (token, rank_ids[t, lane]) and its row in this layout.
  const int dest_rank = in ? p.rank_ids[pair] : -1;
  int dest_row = dest_rank >= 0 ? p.send_row[pair] : -1;
  if (dest_row >= 0 && p.capacity > 0) {
    const int slot = dest_row - p.rank_offsets[dest_rank];
    dest_row = slot < p.capacity ? dest_rank * p.capacity + slot : -1;
    if (dest_row < 0) {
      report_device_error(p.error_flag, kEpCapacityOverflow);
    }
  }
  dest_row = dest_row < p.num_send_rows ? dest_row : -1;
  if (in) {
    p.send_row_out[pair] = dest_row;
  }
  // This lane's pair.
  const int64_t id = in ? static_cast<int64_t>(ids[pair]) : -1;
  const bool valid = id >= 0 && id < p.num_experts;
  const int rank = valid ? p.expert_rank[id] : -1;
  int row = -1;
  for (int j = 0; j < K; ++j) {
    const int r = __shfl_sync(0xffffffffu, dest_rank, j);
    const int r_row = __shfl_sync(0xffffffffu, dest_row, j);
    // Entries past the last pair of each destination row: -1 / 0 / 0.
    const int pairs_here = __popc(__ballot_sync(0xffffffffu, valid && rank == r));
    if (r >= 0 && r_row >= 0 && in && lane >= pairs_here) {
      int* meta = p.meta + int64_t(r_row) * kMetaFields * K;
      meta[lane] = -1;
      meta[K + lane] = 0;
      meta[2 * K + lane] = 0;
    }
    if (valid && r == rank) {
      row = r_row;
    }
  }
  const unsigned same_rank = __match_any_sync(0xffffffffu, valid ? rank : -2 - lane);
  const int entry = __popc(same_rank & lanemask_lt());
  if (in) {
    p.pair_slot[pair] = valid && row >= 0 ? row * K + entry : -1;
  }
  if (valid && row >= 0) {
    int* meta = p.meta + int64_t(row) * kMetaFields * K;
    meta[entry] = p.expert_local[id];
    meta[K + entry] = p.expert_row[pair] - p.expert_offsets[id];
    meta[2 * K + entry] = __float_as_int(weights != nullptr ? to_float(weights[pair]) : 1.0f);
  }
}

// Counts each rank is sent: [W, 1 + L] = rows, then this source's pairs of each of its experts.
static __global__ void __launch_bounds__(kThreads)
    send_counts_kernel(int num_ranks, int max_local, const int* __restrict__ rank_offsets,
                       const int* __restrict__ expert_offsets, const int* __restrict__ rank_experts,
                       int* __restrict__ send_counts) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int cols = 1 + max_local;
  if (i >= num_ranks * cols) {
    return;
  }
  const int r = i / cols, c = i % cols;
  int count;
  if (c == 0) {
    count = rank_offsets[r + 1] - rank_offsets[r];
  } else {
    const int e = rank_experts[r * max_local + c - 1];
    count = e >= 0 ? expert_offsets[e + 1] - expert_offsets[e] : 0;
  }
  send_counts[i] = count;
}

struct UnpackParams {
  int num_ranks;        // W sources
  int max_local;        // L columns of the counts after the row count
  int num_local;        // this rank's experts (<= max_local)
  int source_capacity;  // rows per source region; 0: regions packed back to back (exact sizes)
  int align;
  int num_out_rows;
  int64_t num_recv_rows;  // rows of the receive buffer
  int top_k;
  const int* recv_counts;  // [W, 1 + L] what each source sent
  const int* recv_meta;    // [num_recv_rows, 3, K]
  int* source_start;       // ws [W + 1]: first receive row of each source
  int* base;               // ws [W, num_local]
  int* expert_start;       // ws [num_local + 1] padded starts (unclamped)
  int* expert_count;       // ws [num_local]
  int* expert_offsets;     // out [num_local + 1], clamped to num_out_rows
  int* row_map;            // out [num_recv_rows, K]: output row of each meta entry, -1 none
  float* weights;          // out [num_recv_rows, K]
  int* error_flag;
};

// 3. One block of kPermuteScanThreads threads: expert offsets, base[s][l], source starts.
static __global__ void __launch_bounds__(kPermuteScanThreads) unpack_scan_kernel(UnpackParams p) {
  __shared__ int warp_sums[32];
  const int cols = 1 + p.max_local;
  const int l = threadIdx.x;
  int total = 0;
  if (l < p.num_local) {
    for (int s = 0; s < p.num_ranks; ++s) {
      total += p.recv_counts[s * cols + 1 + l];
    }
  }
  const int padded = (total + p.align - 1) / p.align * p.align;
  int all_rows = 0;
  const int start = block_exclusive_sum(l < p.num_local ? padded : 0, warp_sums, all_rows);
  if (l < p.num_local) {
    p.expert_start[l] = start;
    p.expert_count[l] = total;
    p.expert_offsets[l] = min(start, p.num_out_rows);
    int row = start;
    for (int s = 0; s < p.num_ranks; ++s) {
      p.base[s * p.num_local + l] = row;
      row += p.recv_counts[s * cols + 1 + l];
    }
  }
  __syncthreads();  // block_exclusive_sum reuses warp_sums
  int received = 0;
  const int rows = threadIdx.x < p.num_ranks ? p.recv_counts[threadIdx.x * cols] : 0;
  const int source_start = block_exclusive_sum(rows, warp_sums, received);
  if (threadIdx.x <= p.num_ranks) {
    p.source_start[threadIdx.x] = p.source_capacity > 0
                                      ? threadIdx.x * p.source_capacity
                                      : (threadIdx.x < p.num_ranks ? source_start : received);
  }
  if (threadIdx.x == 0) {
    p.expert_start[p.num_local] = all_rows;
    p.expert_offsets[p.num_local] = min(all_rows, p.num_out_rows);
    if (all_rows > p.num_out_rows) {
      report_device_error(p.error_flag, kEpUnpackRowsOverflow);
    }
    if (p.source_capacity == 0 && int64_t(received) > p.num_recv_rows) {
      report_device_error(p.error_flag, kEpBadCounts);
    }
  }
}

// 4. One thread per receive row: the output row of each of its meta entries.
static __global__ void __launch_bounds__(kThreads) unpack_index_kernel(UnpackParams p) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= p.num_recv_rows) {
    return;
  }
  const int K = p.top_k, cols = 1 + p.max_local;
  int s = 0;
  while (s + 1 < p.num_ranks && p.source_start[s + 1] <= j) {
    ++s;
  }
  const int64_t i = j - p.source_start[s];
  const bool live = i < p.recv_counts[s * cols];
  const int* meta = p.recv_meta + j * kMetaFields * K;
  bool bad = false, overflow = false;
  for (int k = 0; k < K; ++k) {
    int row = -1;
    float w = 0.0f;
    if (live) {
      const int l = meta[k];
      const int eidx = meta[K + k];
      if (l >= p.num_local || (l >= 0 && (eidx < 0 || eidx >= p.recv_counts[s * cols + 1 + l]))) {
        bad = true;
      } else if (l >= 0) {
        row = p.base[s * p.num_local + l] + eidx;
        w = __int_as_float(meta[2 * K + k]);
        if (row >= p.num_out_rows) {
          row = -1;
          overflow = true;
        }
      }
    }
    p.row_map[j * K + k] = row;
    p.weights[j * K + k] = w;
  }
  if (bad) {
    report_device_error(p.error_flag, kEpBadCounts);
  }
  if (overflow) {
    report_device_error(p.error_flag, kEpUnpackRowsOverflow);
  }
}

}  // namespace ep
}  // namespace moe_kernels
