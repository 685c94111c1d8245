// Our own Hopper (sm_90a) BF16 grouped GEMM, a variant of the FP8 kernel
// (moe_kernels/fp8_grouped_sm90.cuh, whose PTX wrappers and tile walk it reuses). Raw PTX only: no
// CUTLASS. The library's configuration bf16_wgmma_128x256 (csrc/gemm/grouped_gemm_wgmma.cuh)
// launches CfgBf16_256x3_D4; prototypes/bf16_grouped_gemm/ checks and benchmarks all its variants.
//
//   out[rows of e] = a[rows of e] @ b[e]^T, a bf16 [M, K], b bf16 [E, N, K] (K contiguous),
//   rows of expert e = [off[e], off[e+1]) with off int32 [E+1] on the device (clamped into [0, M]),
//   out bf16 [M, N], fp32 accumulation.
//
// Same structure as the FP8 kernel (persistent grid, 384 threads = 2 math warpgroups on rows 0-63 /
// 64-127 of a 128 x BN tile + 1 producer warpgroup of which one thread issues TMA, full/empty
// mbarrier ring, banded tile walk, TMA-store epilogue through a dedicated smem_d, expert tails by
// 16-B stores, optional 2-CTA cluster with A multicast, PDL). What differs:
//   * no scales and no promotion: the wgmmas accumulate straight into the accumulators (scale-d = 0
//     on the first k-step of a tile), so there is no `tmp` and no FFMA;
//   * the math warpgroups keep one k-block of wgmmas in flight: issue k-block kb, commit,
//     wgmma.wait_group 1 (k-block kb-1 is done), release kb-1's stage. The tensor cores see
//     back-to-back wgmma chains instead of a drain per k-block (the FP8 kernel had to wait 0 before
//     promoting);
//   * k-block of 64 bf16 (= 128-B rows, the 128B-swizzle width), 4 k-steps of k16 (+32 B each);
//   * the producer is one thread (no scale cp.async): full barriers have count 1;
//   * the epilogue buffer smem_d can be a ring of DBOX < BN/64 boxes of 64x64 per warpgroup, which
//     frees shared memory for one more stage (the TMA store of box j must have read its slot before
//     box j + DBOX is written: cp.async.bulk.wait_group.read DBOX-1).
#pragma once

#include "moe_kernels/fp8_grouped_sm90.cuh"

namespace moe_kernels {
namespace bf16g {

// Reused from the FP8 kernel: PTX wrappers (mbarrier, TMA, cluster, descriptors, named barriers,
// TMA store), the tile walk (decode_tile, BM = 128, bands of 16 m-tiles), the
// tensor-map encoder and the bf16 output map.
using fp8g::BM;
using fp8g::cluster_id;
using fp8g::cluster_rank;
using fp8g::cluster_sync;
using fp8g::decode_tile;
using fp8g::fence_regs;
using fp8g::kMathThreads;
using fp8g::kMaxExperts;
using fp8g::kThreads;
using fp8g::ld_shared_s32;
using fp8g::mbar_expect_tx;
using fp8g::mbar_init;
using fp8g::mbar_wait;
using fp8g::num_clusters;
using fp8g::opaque;
using fp8g::read_tid_x;
using fp8g::smem_u32;
using fp8g::sw128_desc;
using fp8g::Tile;
using fp8g::tma_load_2d;
using fp8g::tma_load_2d_multicast;
using fp8g::tma_store_2d;
using fp8g::wg_bar_sync;
using fp8g::wgmma_commit;
using fp8g::wgmma_fence;
using fp8g::wgmma_wait0;

constexpr int BK = 64;  // bf16 per k-block: one 128-B row of the 128B swizzle
constexpr int KSTEPS = BK / 16;

// ------------------------------------------------------------------------------------------------
// bf16 wgmma (both operands K-major in shared memory: imm-trans-a = imm-trans-b = 0). scale_d is a
// run-time predicate: 0 on the first k-step of a tile. The k16 step inside the 128-B swizzled row
// is 16 bf16 = 32 B: +2 on the descriptor's start-address field (address >> 4).
// ------------------------------------------------------------------------------------------------
#define BF16G_D8(i)                                                                           \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

// d[64] (+)= A(64x16, smem) * B(128x16, smem)^T, bf16 x bf16 -> fp32; scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db, uint32_t scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "
      "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "
      "%62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : BF16G_D8(0), BF16G_D8(8), BF16G_D8(16), BF16G_D8(24), BF16G_D8(32), BF16G_D8(40), BF16G_D8(48),
        BF16G_D8(56)
      : "l"(da), "l"(db), "r"(scale_d));
}

// d[96] (+)= A(64x16, smem) * B(192x16, smem)^T, bf16 x bf16 -> fp32; scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_m64n192k16(float (&d)[96], uint64_t da, uint64_t db, uint32_t scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "
      "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "
      "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "
      "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
      "%96, %97, p, 1, 1, 0, 0;\n}\n"
      : BF16G_D8(0), BF16G_D8(8), BF16G_D8(16), BF16G_D8(24), BF16G_D8(32), BF16G_D8(40), BF16G_D8(48),
        BF16G_D8(56), BF16G_D8(64), BF16G_D8(72), BF16G_D8(80), BF16G_D8(88)
      : "l"(da), "l"(db), "r"(scale_d));
}

// d[128] (+)= A(64x16, smem) * B(256x16, smem)^T, bf16 x bf16 -> fp32; scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db,
                                                 uint32_t scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "
      "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "
      "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "
      "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, "
      "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, "
      "%119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : BF16G_D8(0), BF16G_D8(8), BF16G_D8(16), BF16G_D8(24), BF16G_D8(32), BF16G_D8(40), BF16G_D8(48),
        BF16G_D8(56), BF16G_D8(64), BF16G_D8(72), BF16G_D8(80), BF16G_D8(88), BF16G_D8(96), BF16G_D8(104),
        BF16G_D8(112), BF16G_D8(120)
      : "l"(da), "l"(db), "r"(scale_d));
}
#undef BF16G_D8

template <int WN>
__device__ __forceinline__ void wgmma_k16(float (&d)[WN / 2], uint64_t da, uint64_t db, uint32_t scale_d) {
  if constexpr (WN == 128)
    wgmma_m64n128k16(d, da, db, scale_d);
  else if constexpr (WN == 192)
    wgmma_m64n192k16(d, da, db, scale_d);
  else
    wgmma_m64n256k16(d, da, db, scale_d);
}

// At most N groups of this thread's wgmmas still pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// At most N bulk (TMA store) groups of this thread still reading shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// A math warp is done with a stage (the FP8 kernel's release_stage without its `if (lane ...)`):
// lane c < CLUSTER arrives on the empty barrier of cluster rank c when `pred`. The predicate lives inside the
// asm (as CUTLASS's ClusterBarrier::arrive) so that no divergent branch separates a wgmma in flight
// from the next one: ptxas serialises every wgmma (C7520, "WG.AR in divergent path") otherwise.
template <int CLUSTER>
__device__ __forceinline__ void release_stage_if(uint32_t bar_empty, int lane, bool pred) {
  __syncwarp();
  if constexpr (CLUSTER > 1) {
    asm volatile(
        "{ .reg .pred p; .reg .b32 remote; setp.ne.b32 p, %2, 0;"
        " mapa.shared::cluster.u32 remote, %0, %1;"
        " @p mbarrier.arrive.shared::cluster.b64 _, [remote]; }" ::"r"(bar_empty),
        "r"(lane & (CLUSTER - 1)), "r"((int)(pred && lane < CLUSTER))
        : "memory");
  } else {
    asm volatile(
        "{ .reg .pred p; setp.ne.b32 p, %1, 0;"
        " @p mbarrier.arrive.shared::cta.b64 _, [%0]; }" ::"r"(bar_empty),
        "r"((int)(pred && lane == 0))
        : "memory");
  }
}

// The math warps' wait on a full barrier, with a warp-uniform loop (vote over the lanes' polls; a
// completed phase stays completed until this warp releases the stage) and so a uniform hang trap:
// fp8g::mbar_wait's per-lane loop and trap are divergent paths, and with a wgmma group in flight
// across the wait ptxas serialises every wgmma (C7518, "WG.DP in divergent path").
__device__ __forceinline__ void mbar_wait_warp(uint32_t bar, uint32_t parity) {
#ifndef FP8G_NO_HANG_TRAP
  uint32_t polls = 0;
  while (!__all_sync(0xffffffffu, fp8g::mbar_try_wait(bar, parity)))
    if (++polls == (1u << 28))
      __trap();
#else
  while (!__all_sync(0xffffffffu, fp8g::mbar_try_wait(bar, parity))) {
  }
#endif
}

// A value the compiler can treat as warp-uniform (lane 0's, as CUTLASS's canonical_warp_idx_sync):
// every branch around and between the wgmmas must be provably uniform, or ptxas serialises them.
__device__ __forceinline__ int uniform(int v) {
  return __shfl_sync(0xffffffffu, v, 0);
}

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------
// BN: tile columns; WN: N of one wgmma instruction ("slab"; BN = SLABS x WN); STAGES: pipeline
// depth; CLUSTER: 1, or 2 CTAs on neighbouring n-tiles of one m-tile sharing the A tile by
// multicast; DBOX: 64x64 epilogue boxes per math warpgroup (BN/64 = the whole tile, fewer = a ring).
template <int BN_, int WN_, int STAGES_, int CLUSTER_, int DBOX_>
struct Config {
  static constexpr int BN = BN_, WN = WN_, STAGES = STAGES_, CLUSTER = CLUSTER_, DBOX = DBOX_;
  static_assert(WN == 128 || WN == 192 || WN == 256, "wgmma N of 128, 192 or 256");
  static_assert(BN % WN == 0 && BN / WN <= 2 && BN <= 256, "one or two slabs, at most 256 columns");
  static constexpr int SLABS = BN / WN;
  static_assert(CLUSTER == 1 || CLUSTER == 2, "clusters of 1 or 2 CTAs");
  static_assert(DBOX >= 1 && DBOX <= BN / 64, "1 .. BN/64 epilogue boxes");
  static constexpr int A_BYTES = BM * BK * 2;            // 16 KB
  static constexpr int B_BYTES = BN * BK * 2;            // BN x 128 B
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;  // multiple of 1024
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int D_BOX_BYTES = 64 * 128;  // 64 rows x 64 bf16, 128B swizzle (the TMA store box)
  static constexpr int D_WG_BYTES = DBOX * D_BOX_BYTES;
  static constexpr int D_BYTES = 2 * D_WG_BYTES;
  static constexpr int BAR_OFF = PIPE_BYTES + D_BYTES;
  static constexpr int OFF_OFF = BAR_OFF + 2 * STAGES * 8;
  static constexpr size_t smem_bytes(int num_experts) {
    return 1024 + OFF_OFF + 2 * (size_t)(num_experts + 1) * 4;
  }
  static_assert(smem_bytes(kMaxExperts) <= 232448, "shared memory over the sm_90 limit (227 KB)");
};

// ------------------------------------------------------------------------------------------------
// Kernel
// ------------------------------------------------------------------------------------------------
template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    bf16_grouped_kernel(const __grid_constant__ CUtensorMap tmap_a,
                        const __grid_constant__ CUtensorMap tmap_b,
                        const __grid_constant__ CUtensorMap tmap_d, const int32_t* __restrict__ offsets,
                        __nv_bfloat16* __restrict__ out, int* __restrict__ error_flag, int m_total, int n,
                        int k, int num_experts) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = Cfg::BN, STAGES = Cfg::STAGES, SLABS = Cfg::SLABS, WN = Cfg::WN, CLUSTER = Cfg::CLUSTER,
                DBOX = Cfg::DBOX;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t smem_d = base + Cfg::PIPE_BYTES;
  const uint32_t bar_full = base + Cfg::BAR_OFF;
  const uint32_t bar_empty = bar_full + STAGES * 8;
  int* s_off = reinterpret_cast<int*>(smem + Cfg::OFF_OFF);  // [E+1]
  int* s_tiles = s_off + num_experts + 1;                    // [E+1]

  const int tid = threadIdx.x;
  int warp = tid / 32, lane = tid % 32;
  const int n_tiles = ((n + BN - 1) / BN + CLUSTER - 1) / CLUSTER;  // n-units (decode_tile)

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 1);  // the producer's arrive_expect_tx
      // One arrival per math warp of every CTA of the cluster: a stage is refilled (A multicast into
      // both CTAs) only when both have consumed it.
      mbar_init(bar_empty + 8 * s, CLUSTER * kMathThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  if (warp == kMathThreads / 32 && lane == 0) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_b)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_d)) : "memory");
  }
  // PDL: nothing above touched global memory.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // Offsets clamped into [0, M]; CTA 0 reports corrupt ones (as the FP8 kernel).
  for (int i = tid; i <= num_experts; i += kThreads) {
    const int offset = offsets[i];
    s_off[i] = min(max(offset, 0), m_total);
    if (blockIdx.x == 0 && error_flag != nullptr && i < num_experts) {
      const int next = offsets[i + 1];
      if (offset < 0 || next < offset || next > m_total)
        report_device_error(error_flag, kGroupedGemmBadOffsets);
    }
  }
  __syncthreads();
  if (warp == 0) {  // exclusive prefix sum of tiles per expert
    const int chunk = (num_experts + 31) / 32;
    const int lo = min(lane * chunk, num_experts), hi = min(lo + chunk, num_experts);
    int sum = 0;
    for (int e = lo; e < hi; ++e)
      sum += (max(s_off[e + 1] - s_off[e], 0) + BM - 1) / BM * n_tiles;
    int incl = sum;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d)
        incl += v;
    }
    int run = incl - sum;
    for (int e = lo; e < hi; ++e) {
      s_tiles[e] = run;
      run += (max(s_off[e + 1] - s_off[e], 0) + BM - 1) / BM * n_tiles;
    }
    if (lane == 31)
      s_tiles[num_experts] = incl;
  }
  __syncthreads();
  // The peer's barriers are initialised before any multicast or remote arrival reaches them.
  if constexpr (CLUSTER > 1)
    cluster_sync();
  const uint32_t total_addr = base + Cfg::OFF_OFF + (2 * num_experts + 1) * 4;
  const auto first_tile = [] { return CLUSTER > 1 ? cluster_id() : (int)blockIdx.x; };
  const auto tile_stride = [] { return CLUSTER > 1 ? num_clusters() : (int)gridDim.x; };
  const auto my_rank = [] { return CLUSTER > 1 ? cluster_rank() : 0; };

  if (warp >= kMathThreads / 32) {
    // ---------------------------------------------------------------- producer (one thread)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (warp == kMathThreads / 32 && lane == 0) {
      const int kb_count = opaque(k) / BK;
      int stage = 0, cursor = 0;
      uint32_t phase = 0;
      for (int t = first_tile(); t < ld_shared_s32(total_addr); t += tile_stride()) {
        const int rank = my_rank();
        const Tile tile = decode_tile<BN, CLUSTER>(t, cursor, s_off, s_tiles, opaque(n), rank);
        const int b_row = tile.expert * n + tile.n0;
        for (int kb = 0; kb < kb_count; ++kb) {
          mbar_wait(bar_empty + 8 * stage, phase ^ 1);
          const uint32_t full = bar_full + 8 * stage;
          const uint32_t sa = base + stage * Cfg::STAGE_BYTES;
          // Every CTA of the cluster receives the whole A tile (its own share and the peer's), and
          // its own B tile unless it is a ghost.
          mbar_expect_tx(full, Cfg::A_BYTES + (tile.ghost ? 0 : Cfg::B_BYTES));
          if constexpr (CLUSTER > 1) {
            constexpr int share = BM / CLUSTER;  // rows of A this CTA loads for the cluster
            tma_load_2d_multicast(sa + rank * share * BK * 2, &tmap_a, full, kb * BK,
                                  tile.row0 + rank * share, (1 << CLUSTER) - 1);
          } else {
            tma_load_2d(sa, &tmap_a, full, kb * BK, tile.row0);
          }
          if (!tile.ghost)
            tma_load_2d(sa + Cfg::A_BYTES, &tmap_b, full, kb * BK, b_row);
          if (++stage == STAGES)
            stage = 0, phase ^= 1;
        }
      }
      if constexpr (CLUSTER > 1) {
        // Drain: every stage's last use released by the math warps of both CTAs (the peer's
        // arrivals land in this CTA's shared memory, which must outlive them).
        for (int i = 0; i < STAGES; ++i) {
          mbar_wait(bar_empty + 8 * stage, phase ^ 1);
          if (++stage == STAGES)
            stage = 0, phase ^= 1;
        }
      }
    }
    return;
  }

  // ------------------------------------------------------------------ math warpgroups
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  int kb_count;
  {
    const int tid_m = read_tid_x();
    warp = tid_m / 32, lane = tid_m % 32;
    kb_count = uniform(opaque(k) / BK);
  }
  const int wg = uniform(warp / 4);
  const int rw = (warp % 4) * 16 + lane / 4;  // fragment rows rw and rw + 8 of the warpgroup's 64
  const int t_wg = (warp % 4) * 32 + lane;    // thread index inside the warpgroup
  const uint32_t d_wg = smem_d + wg * Cfg::D_WG_BYTES;

  float acc[SLABS][WN / 2];
  int stage = 0, cursor = 0;
  uint32_t phase = 0;

  // Loop bounds and the per-tile work split go through `uniform`: see there.
  for (int t = first_tile(); t < uniform(ld_shared_s32(total_addr)); t += tile_stride()) {
    const Tile tile = decode_tile<BN, CLUSTER>(t, cursor, s_off, s_tiles, opaque(n), my_rank());
    const int n0 = tile.n0;
    // Work of this warpgroup: 64 rows from a_off, slabs [s_lo, s_hi). Two slabs: with an N tail of
    // <= WN only one; narrow tile (<= 64 rows): both warpgroups on rows 0-63, one slab each.
    int a_off = wg * 64, s_lo = 0, s_hi = 1;
    if constexpr (SLABS == 2) {
      const int slabs = min(SLABS, (n - n0 + WN - 1) / WN);
      const bool narrow = slabs == 2 && tile.rows <= 64;
      a_off = uniform(narrow ? 0 : wg * 64);
      s_lo = uniform(narrow ? wg : 0);
      s_hi = uniform(narrow ? wg + 1 : slabs);
    }
    const bool active = uniform(!tile.ghost && a_off < tile.rows);

    // Mainloop: k-block kb's wgmmas are issued before k-block kb-1's are waited for; kb-1's stage is
    // released then. `prev` is the stage of the last k-block issued.
    int prev = 0;
    for (int kb = 0; kb < kb_count; ++kb) {
      const uint32_t sa = base + stage * Cfg::STAGE_BYTES;
      mbar_wait_warp(bar_full + 8 * stage, phase);
      if (active) {
        const uint64_t da = sw128_desc(sa + a_off * BK * 2);
        const uint32_t sb = sa + Cfg::A_BYTES;
        // Each case is one whole fence / wgmmas / commit / wait block: wgmmas issued under a per-slab
        // condition make ptxas serialise them (C7520).
        if (SLABS == 1 || s_hi - s_lo == 2) {
          wgmma_fence();
#pragma unroll
          for (int s = 0; s < SLABS; ++s) {
            const uint64_t db = sw128_desc(sb + s * WN * BK * 2);
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks)
              wgmma_k16<WN>(acc[s], da + 2 * ks, db + 2 * ks, (kb | ks) != 0);
          }
          wgmma_commit();
          wgmma_wait<1>();
        } else if (s_lo == 0) {  // two slabs, only the first: an N tail of <= WN columns
          wgmma_fence();
          const uint64_t db = sw128_desc(sb);
#pragma unroll
          for (int ks = 0; ks < KSTEPS; ++ks)
            wgmma_k16<WN>(acc[0], da + 2 * ks, db + 2 * ks, (kb | ks) != 0);
          wgmma_commit();
          wgmma_wait<1>();
        } else {  // narrow tile, warpgroup 1: the second slab
          wgmma_fence();
          const uint64_t db = sw128_desc(sb + WN * BK * 2);
#pragma unroll
          for (int ks = 0; ks < KSTEPS; ++ks)
            wgmma_k16<WN>(acc[SLABS - 1], da + 2 * ks, db + 2 * ks, (kb | ks) != 0);
          wgmma_commit();
          wgmma_wait<1>();
        }
        release_stage_if<CLUSTER>(bar_empty + 8 * prev, lane, kb > 0);
      } else {
        release_stage_if<CLUSTER>(bar_empty + 8 * stage, lane, true);
      }
      prev = stage;
      if (++stage == STAGES)
        stage = 0, phase ^= 1;
    }

    // Epilogue of this warpgroup: rows [row0 + a_off, +64) x columns [n0 + s_lo*WN, +ncols), box by
    // box (local columns 64j..64j+63) through its ring of DBOX smem_d slots. Only this warpgroup
    // touches its slots, so 128-thread named barriers (ids 1 and 2) suffice.
    // No wgmma in flight past this point (outside the uniform mainloop): an unconditional wait.
    wgmma_wait0();
#pragma unroll
    for (int s = 0; s < SLABS; ++s)
      fence_regs(acc[s]);
    if (active) {
      release_stage_if<CLUSTER>(bar_empty + 8 * prev, lane, true);
      const int rows_valid = min(64, tile.rows - a_off);
      const int col0 = n0 + s_lo * WN;
      const int cols_valid = min((s_hi - s_lo) * WN, n - col0);  // a multiple of 64
      const int row0 = tile.row0 + a_off;
      // The previous tile's TMA stores must have finished reading smem_d before it is overwritten.
      if (t_wg == 0)
        bulk_wait_read<0>();
      wg_bar_sync(wg);
      // Addresses from `opaque` values: otherwise they are hoisted out of the tile loop and kept
      // live across the mainloop (the FP8 kernel's spills).
      const int sw = opaque(lane / 4);  // = row % 8 for rows rw and rw + 8
      const uint32_t row_addr = d_wg + opaque(rw * 128 + (lane % 4) * 4);
#pragma unroll
      for (int s = 0; s < SLABS; ++s) {
        if (s >= s_lo && s < s_hi) {
#pragma unroll
          for (int b = 0; b < WN / 64; ++b) {
            const int j = (s - s_lo) * (WN / 64) + b;  // box of the warpgroup's columns
            if (j * 64 < cols_valid) {
              const int slot = DBOX == BN / 64 ? j : j % DBOX;
              if (DBOX < BN / 64 && j >= DBOX) {
                // Ring: box j - DBOX's store (committed DBOX groups ago) has read this slot, and
                // (expert tail) every thread has read it back.
                if (t_wg == 0)
                  bulk_wait_read<DBOX - 1>();
                wg_bar_sync(wg);
              }
              const uint32_t box = row_addr + slot * Cfg::D_BOX_BYTES;
#pragma unroll
              for (int q = 0; q < 8; ++q) {
                // 16-B chunk q of rows rw and rw + 8 of the box, XOR-swizzled with row % 8
                const int i = b * 8 + q;  // 8-column chunk of the slab
                const uint32_t addr = box + ((q ^ sw) * 16);
                __nv_bfloat162 lo = __floats2bfloat162_rn(acc[s][4 * i + 0], acc[s][4 * i + 1]);
                __nv_bfloat162 hi = __floats2bfloat162_rn(acc[s][4 * i + 2], acc[s][4 * i + 3]);
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(*reinterpret_cast<uint32_t*>(&lo))
                             : "memory");
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr + 8 * 128),
                             "r"(*reinterpret_cast<uint32_t*>(&hi))
                             : "memory");
              }
              // Generic-proxy writes -> visible to the TMA (async proxy) store.
              asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
              wg_bar_sync(wg);
              const uint32_t slot_addr = d_wg + slot * Cfg::D_BOX_BYTES;
              if (rows_valid == 64) {
                // All 64 rows belong to the expert: TMA store (clips at M; completes asynchronously),
                // one bulk group per box (the ring's wait counts groups).
                if (t_wg == 0) {
                  tma_store_2d(&tmap_d, slot_addr, col0 + j * 64, row0);
                  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
                }
              } else {
                // Expert tail: rows past rows_valid belong to the next expert (another CTA may be
                // writing them): 16-B stores of the valid rows only, 8 per row, coalesced.
                for (int idx = t_wg; idx < rows_valid * 8; idx += 128) {
                  const int r = idx / 8, c = idx % 8;
                  const uint32_t src = slot_addr + r * 128 + ((c ^ (r % 8)) * 16);
                  uint32_t v0, v1, v2, v3;
                  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                               : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                               : "r"(src)
                               : "memory");
                  __nv_bfloat16* dst = out + (int64_t)(row0 + r) * n + col0 + j * 64 + c * 8;
                  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(v0), "r"(v1),
                               "r"(v2), "r"(v3)
                               : "memory");
                }
              }
            }
          }
        }
      }
    }
    // Outstanding TMA stores must be complete before the CTA (and its smem_d) goes away: on the
    // CTA's last tile, inside the loop (code after the tile loop costs registers, see the FP8 kernel).
    if (t + tile_stride() >= ld_shared_s32(total_addr) && t_wg == 0)
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
// 2-D bf16 map [rows, k] (k contiguous), box {64 (k, 128 B), box_rows}, 128B swizzle, zero fill.
inline bool make_map(CUtensorMap* map, const void* ptr, uint64_t rows, uint64_t k, uint32_t box_rows) {
  return fp8g::encode_map_2d(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, ptr, rows, k, k * 2, BK, box_rows,
                             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

// n, k positive multiples of 64 (whole epilogue boxes and k-blocks), 1 <= E <= kMaxExperts, the
// 32-bit B row index E*N cannot overflow, and a, b, out 16-byte aligned (TMA, 16-B stores).
inline bool bf16_grouped_supports(int64_t m_total, int64_t n, int64_t k, int64_t num_experts, const void* a,
                                  const void* b, const void* out) {
  return n > 0 && k > 0 && n % 64 == 0 && k % 64 == 0 && num_experts >= 1 && num_experts <= kMaxExperts &&
         m_total >= 0 && m_total < (1ll << 31) && num_experts * n < (1ll << 31) &&
         (m_total / BM + num_experts) * ((n + 127) / 128) < (1ll << 31) &&  // int tile numbers
         reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// out[rows of e] = a[rows of e] @ b[e]^T for the problem of bf16_grouped_supports (else
// cudaErrorInvalidValue). Graph-capturable: the launch depends only on host-known sizes (the offsets
// are read on the device). error_flag: the sticky device-error flag, set when the offsets are not
// non-decreasing within [0, m_total] (or nullptr). With `pdl`, the grid may start while the previous
// kernel of the stream drains; the kernel waits on griddepcontrol.wait before touching global memory.
template <class Cfg>
cudaError_t bf16_grouped_run(const void* a, const void* b, const int32_t* offsets, void* out, int* error_flag,
                             int64_t m_total, int n, int k, int num_experts, int device, int num_sms,
                             bool pdl, cudaStream_t stream) {
  if (!bf16_grouped_supports(m_total, n, k, num_experts, a, b, out))
    return cudaErrorInvalidValue;
  if (m_total == 0)
    return cudaSuccess;
  CUtensorMap map_a, map_b, map_d;
  if (!make_map(&map_a, a, (uint64_t)m_total, (uint64_t)k, BM / Cfg::CLUSTER) ||
      !make_map(&map_b, b, (uint64_t)num_experts * n, (uint64_t)k, Cfg::BN) ||
      !fp8g::make_map_d(&map_d, out, (uint64_t)m_total, (uint64_t)n))
    return cudaErrorInvalidValue;
  constexpr int C = Cfg::CLUSTER;
  const int resident =
      fp8g::resident_units<Cfg>(reinterpret_cast<const void*>(bf16_grouped_kernel<Cfg>), C, kThreads,
                                (int)Cfg::smem_bytes(kMaxExperts), device, num_sms);
  if (resident < 1)
    return cudaErrorInvalidConfiguration;
  const int64_t n_units = ((n + Cfg::BN - 1) / Cfg::BN + C - 1) / C;
  const int64_t max_units = (m_total / BM + num_experts) * n_units;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)(max_units < resident ? max_units : resident) * C);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = Cfg::smem_bytes(num_experts);
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = C;
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = C > 1 ? 2 : 1;
  const cudaError_t err =
      cudaLaunchKernelEx(&cfg, bf16_grouped_kernel<Cfg>, map_a, map_b, map_d, offsets,
                         static_cast<__nv_bfloat16*>(out), error_flag, (int)m_total, n, k, num_experts);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// The variants (prototypes/bf16_grouped_gemm/README.md). Config<BN, WN, STAGES, CLUSTER, DBOX>; stage
// counts: the most that fit next to smem_d in 227 KB with 1024 experts (Config's static_assert).
using Cfg256_S4 = Config<256, 256, 4, 1, 1>;    // n256 wgmma, 1-box epilogue ring
using Cfg256_S3 = Config<256, 256, 3, 1, 4>;    // n256 wgmma, whole-tile smem_d (as the FP8 kernel)
using Cfg256x2_S4 = Config<256, 128, 4, 1, 1>;  // two n128 slabs, narrow tiles
using Cfg192_S5 = Config<192, 192, 5, 1, 1>;    // n192 wgmma, 1-box ring
using Cfg192_S4 = Config<192, 192, 4, 1, 3>;    // n192 wgmma, whole-tile smem_d
using Cfg128_S6 = Config<128, 128, 6, 1, 1>;    // n128 wgmma, 1-box ring
using Cfg256_S4_C2 = Config<256, 256, 4, 2, 1>;
using Cfg192_S5_C2 = Config<192, 192, 5, 2, 1>;

// The library's bf16_wgmma_128x256 (the prototype's BN256_S3_D4): on the H200 as fast as or faster than
// the CUTLASS BF16 configurations in every case of the prototype's benchmark but decode (8 rows per
// expert, where "auto" keeps CUTLASS's 64-row pingpong tile).
using CfgBf16_256x3_D4 = Cfg256_S3;

}  // namespace bf16g
}  // namespace moe_kernels
