// The expert-parallel device path (ep-design.md §3(c)3), framework-free: rows stored straight
// into the other ranks' windows, then per-source counts and a flag published with a system-scope
// release; receivers spin with acquire loads, bounded by a timeout that sets the sticky error flag
// (never a hang). No host step: capturable in a CUDA graph.
//
// Windows are symmetric (same layout on every rank). `peers[r]` is the address, valid on this GPU,
// of rank r's window: NCCL's LSA pointers on a node, or W windows of one allocation in the
// loopback. Source `me` owns region `me` of every area of a destination's window, so concurrent
// senders never overlap. Buffers are reused across calls; dispatch and combine alternate, and each
// waits for every peer's signal, which orders a peer's next writes after this rank's reads.
// Flags count calls (an epoch per direction, in device memory), so a stale flag is never taken for
// a new one.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe_kernels/device_error.cuh"

namespace moe_kernels {
namespace ep {

constexpr int kPushThreads = 256;

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Rows of the staging block bound for rank r ([r * capacity, + n), n = counts[r * count_stride],
// at most capacity) to rank r's window at dst_offset + (region * capacity + i) * row bytes.
struct PushParams {
  const int64_t* peers;  // [W] window addresses
  int num_ranks;
  int region;
  int capacity;
  const int* counts;
  int count_stride;
  const void* src;    // staging rows [W * capacity, row bytes]
  int64_t row_words;  // row bytes / sizeof(V)
  int64_t dst_offset;
};

template <typename V>  // uint4 when rows are whole 16-byte vectors, else uint32_t
__global__ void __launch_bounds__(kPushThreads) push_rows_kernel(PushParams p) {
  const int r = blockIdx.y;
  const int n = min(max(p.counts[r * p.count_stride], 0), p.capacity);
  const int64_t words = int64_t(n) * p.row_words;
  const V* src = static_cast<const V*>(p.src) + int64_t(r) * p.capacity * p.row_words;
  V* dst = reinterpret_cast<V*>(reinterpret_cast<char*>(p.peers[r]) + p.dst_offset) +
           int64_t(p.region) * p.capacity * p.row_words;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = src[i];
  }
  __threadfence_system();  // this block's stores reach the peer before the signal that follows
}

// One block, thread r < W: the counts row bound for rank r (when counts is given) into rank r's
// window, then flag[region] = epoch + 1 with a system-scope release.
__global__ void signal_kernel(const int64_t* __restrict__ peers, int num_ranks, int region,
                              int64_t flags_offset, const int* __restrict__ counts, int count_cols,
                              int64_t counts_offset, const int64_t* __restrict__ epoch) {
  const int r = threadIdx.x;
  if (r >= num_ranks) {
    return;
  }
  char* window = reinterpret_cast<char*>(peers[r]);
  if (counts != nullptr) {
    int* dst = reinterpret_cast<int*>(window + counts_offset) + region * count_cols;
    for (int c = 0; c < count_cols; ++c) {
      dst[c] = counts[r * count_cols + c];
    }
  }
  __threadfence_system();
  store_release_sys(reinterpret_cast<uint64_t*>(window + flags_offset) + region, uint64_t(*epoch) + 1);
}

// One block, thread s < W: spin until source s's flag reaches epoch + 1 (acquire), at most
// timeout_ns; on timeout set the error flag and go on (the data are then stale, never read out of
// bounds). Then the epoch advances.
__global__ void wait_kernel(const uint64_t* flags, int num_ranks, int64_t* epoch, int64_t timeout_ns,
                            int* error_flag) {
  const uint64_t expected = uint64_t(*epoch) + 1;
  if (threadIdx.x < num_ranks) {
    const uint64_t start = global_timer_ns();
    while (load_acquire_sys(flags + threadIdx.x) < expected) {
      if (global_timer_ns() - start > uint64_t(timeout_ns)) {
        report_device_error(error_flag, kEpTimeout);
        break;
      }
      __nanosleep(64);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *epoch = int64_t(expected);
  }
}

}  // namespace ep
}  // namespace moe_kernels
