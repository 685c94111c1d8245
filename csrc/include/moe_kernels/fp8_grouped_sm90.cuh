// Our own Hopper (sm_90a) FP8 grouped GEMM with DeepSeek-V3 block scales (1x128 for A, 128x128
// for B), after DeepGEMM's sm90_fp8_gemm_1d2d (docs/fp8_gemm_design.md). Raw PTX only: no CUTLASS.
// The library's configurations fp8_wgmma_* (csrc/gemm/grouped_gemm_wgmma.cuh) launch it;
// prototypes/fp8_grouped_gemm/ benchmarks all its variants against CUTLASS and torch.
//
//   out[r, n] = bf16( sum_kb sa[r, kb] * sb[e, n/128, kb] * sum_{k in kb} a[r, k] * b[e, n, k] )
//   a e4m3 [M, K], sa fp32 [M, K/128], b e4m3 [E, N, K], sb fp32 [E, N/128, K/128],
//   rows of expert e = [off[e], off[e+1]) with off int32 [E+1] on the device, out bf16 [M, N].
//
// Structure: persistent grid (<= one CTA per SM), 384 threads = 2 math warpgroups (rows 0-63 and
// 64-127 of a 128 x BN tile) + 1 producer warpgroup of which one thread issues the TMA loads into a
// STAGES-deep full/empty mbarrier ring. Each k-block of 128: wgmma into a temporary accumulator,
// wait, release the stage, then final += tmp * (sa[row] * sb) ("promotion", as in DeepGEMM).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moe_kernels/device_error.cuh"

namespace moe_kernels {
namespace fp8g {

constexpr int BM = 128;  // rows per tile: 2 math warpgroups x 64 (wgmma M = 64)
constexpr int BK = 128;  // = the scale block: one promotion per k-block
constexpr int kMathThreads = 256;
constexpr int kThreads = kMathThreads + 128;
constexpr int kBand = 16;  // m-tiles per rasterisation band (see decode_tile)
constexpr int kMaxExperts = 1024;

// ------------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
               : "=r"(done)
               : "r"(bar), "r"(parity)
               : "memory");
  return done != 0;
}

// In a prototype a wrong byte count or phase would hang the GPU forever. After 2^28
// failed polls (each try_wait suspends for a while; > 1 s in all) the kernel traps instead and the
// run reports a launch failure. A 32-bit counter, not clock64: one register fewer, which keeps
// BN = 256 free of spills. Define FP8G_NO_HANG_TRAP to drop the check.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifndef FP8G_NO_HANG_TRAP
  uint32_t polls = 0;
  while (!mbar_try_wait(bar, parity))
    if (++polls == (1u << 28))
      __trap();
#else
  while (!mbar_try_wait(bar, parity)) {
  }
#endif
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
      "[%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// The same box into the same shared-memory offset of every CTA in `mask` (cluster ranks), each
// copy completing its bytes on the mbarrier at `bar`'s offset in that CTA.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                                      int c0, int c1, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// Arrive on the mbarrier at `bar`'s offset in the shared memory of cluster rank `cta` (this CTA
// included). The default semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive:
// the stage's reads are wgmma (async proxy) reads already completed by wgmma.wait_group, and the
// refill is a TMA write ordered by the mbarrier itself. `.release.cluster` compiled to
// MEMBAR.ALL.GPU + ERRBAR per arrival and made the 2-CTA kernel 1.2-1.8x slower than one CTA.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{ .reg .b32 remote; mapa.shared::cluster.u32 remote, %0, %1;"
      " mbarrier.arrive.shared::cluster.b64 _, [remote]; }" ::"r"(bar),
      "r"(cta)
      : "memory");
}

// Read at each use (asm volatile): cheap S2R instead of registers held across the mainloop.
__device__ __forceinline__ int cluster_rank() {
  int r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ int cluster_id() {
  int r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ int num_clusters() {
  int r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// K-major operand tile in the TMA 128B-swizzle layout: rows of 128 B (= BK e4m3), 16-B chunks XORed
// with row % 8, 8-row groups 1024 B apart (SBO). LBO is unused for swizzled K-major layouts.
// Stepping k by 32 inside the 128-B row is a plain +32 B on the start address (the hardware applies
// the swizzle on absolute address bits, which is why every tile base is 1024-aligned).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

// Pins accumulator registers at this point of the program order: without it the compiler may read
// wgmma results before wgmma.wait (they look like ordinary asm outputs) or move FFMAs across it.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    asm volatile("" : "+f"(r[i])::"memory");
}

#define FP8G_D8(i)                                                                            \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

// d[64] (+)= A(64x32, smem) * B(128x32, smem)^T, e4m3 x e4m3 -> fp32. ACCUM = 0 overwrites d.
template <int ACCUM>
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n}\n"
      : FP8G_D8(0), FP8G_D8(8), FP8G_D8(16), FP8G_D8(24), FP8G_D8(32), FP8G_D8(40), FP8G_D8(48), FP8G_D8(56)
      : "l"(da), "l"(db), "n"(ACCUM));
}

// d[96] (+)= A(64x32) * B(192x32)^T: the n192 instruction of the BN = 192 configuration.
template <int ACCUM>
__device__ __forceinline__ void wgmma_m64n192k32(float (&d)[96], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
      "%96, %97, p, 1, 1;\n}\n"
      : FP8G_D8(0), FP8G_D8(8), FP8G_D8(16), FP8G_D8(24), FP8G_D8(32), FP8G_D8(40), FP8G_D8(48), FP8G_D8(56),
        FP8G_D8(64), FP8G_D8(72), FP8G_D8(80), FP8G_D8(88)
      : "l"(da), "l"(db), "n"(ACCUM));
}
// d[48] (+)= A(64x32) * B(96x32)^T: half of a BN = 192 tile, for the split narrow tiles.
template <int ACCUM>
__device__ __forceinline__ void wgmma_m64n96k32(float (&d)[48], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "
      "%48, %49, p, 1, 1;\n}\n"
      : FP8G_D8(0), FP8G_D8(8), FP8G_D8(16), FP8G_D8(24), FP8G_D8(32), FP8G_D8(40)
      : "l"(da), "l"(db), "n"(ACCUM));
}
// d[32] (+)= A(64x32) * B(64x32)^T: a warpgroup's 64 columns of a TALL tile's rows 128-191.
template <int ACCUM>
__device__ __forceinline__ void wgmma_m64n64k32(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1;\n}\n"
      : FP8G_D8(0), FP8G_D8(8), FP8G_D8(16), FP8G_D8(24)
      : "l"(da), "l"(db), "n"(ACCUM));
}
// d[N / 2] (+)= A(64x32) * B(Nx32)^T for N = 16 or 32: TAIL_SWAP's tail, A = 64 weight rows, B = the
// tail's first N token rows. d is an array of its own: a view of a larger one (the first N / 2 of
// the n64 tail's registers) made ptxas serialise every wgmma of the kernel (C7511).
template <int N, int ACCUM>
__device__ __forceinline__ void wgmma_m64nNk32_tail(float (&d)[N / 2], uint64_t da, uint64_t db) {
  static_assert(N == 16 || N == 32, "swapped tail N: 16 or 32");
  if constexpr (N == 32) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1;\n}\n"
        : FP8G_D8(0), FP8G_D8(8)
        : "l"(da), "l"(db), "n"(ACCUM));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
        : FP8G_D8(0)
        : "l"(da), "l"(db), "n"(ACCUM));
  }
}
#undef FP8G_D8

__device__ __forceinline__ int ld_shared_s32(uint32_t addr) {
  int v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ int opaque(int v) {  // a copy the compiler cannot CSE with earlier ones
  asm volatile("" : "+r"(v));
  return v;
}

// k-blocks of 128: a compile-time constant for K_FIXED configurations, else read at run time.
template <class Cfg>
__device__ __forceinline__ int k_blocks(int k) {
  return Cfg::K_FIXED ? Cfg::K_FIXED / BK : opaque(k) / BK;
}

__device__ __forceinline__ int read_tid_x() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

// ------------------------------------------------------------------------------------------------
// Tile walk
// ------------------------------------------------------------------------------------------------
struct Tile {
  int expert, row0, rows, n0;  // rows: valid rows of the tile (1..128, or 1..192 for the last m-tile of
                               // a TALL configuration; <= 0 for an m-ghost); n0: first column
  bool ghost;  // n0 >= N or past the expert's m-tiles: this CTA of a cluster only loads its share of the
               // multicast tile (A, or B with SHARE_B)
};

// Tiles are numbered expert by expert (s_tiles = exclusive prefix of each expert's tile count).
// Inside an expert: bands of kBand m-tiles; inside a band the m-tile index runs fastest, then the
// n-tile. The ~132 CTAs resident at a time take consecutive tile numbers, so they work on the same
// few B n-tiles (each B tile is read from HBM once and then hit in L2 by all m-tiles of the band)
// while the band's A rows (<= 16 x 128 rows x K, 15 MB at K = 7168) stay L2-resident across the
// expert's n-tiles. With 1 m-tile per expert (decode) a wave streams consecutive n-tiles of B.
// `cursor` only moves forward: a CTA's tile numbers increase, so the expert search is amortised.
// With clusters a "tile" t is a unit of CM x CN tiles (CM neighbouring m-tiles of one expert, or CN
// neighbouring n-tiles): cluster rank r takes m-tile CM * m_unit + r or n-tile CN * n_unit + r.
// Past the expert's m-tiles or past N it is a ghost, which only loads its share of the multicast
// tile. Bands then hold kBand / CM m-units.
// m-tiles of an expert with `rows` >= 0 rows: 128-row tiles, except that with TALL the last one takes up
// to 192 rows (64 more than BM), so that a tail of <= 64 rows rides on the tile before it instead of
// taking a tile of its own: 129-192 rows are one tile, 193-320 two.
template <bool TALL>
__device__ __forceinline__ int m_tiles_of(int rows) {
  if constexpr (TALL)
    return rows <= 0 ? 0 : max(1, (rows - 64 + BM - 1) / BM);
  else
    return (rows + BM - 1) / BM;
}

template <int BN, int CN, int CM = 1, bool TALL = false>
__device__ __forceinline__ Tile decode_tile(int t, int& cursor, const int* s_off, const int* s_tiles, int n,
                                            int rank) {
  static_assert(CM == 1 || CN == 1, "a cluster along M or along N");
  constexpr int kBandUnits = kBand / CM;
  const int n_tiles = ((n + BN - 1) / BN + CN - 1) / CN;  // n-units of CN tiles
  while (t >= s_tiles[cursor + 1])
    ++cursor;  // also skips empty experts (zero tiles)
  const int e = cursor;
  const int begin = s_off[e], end = s_off[e + 1];
  const int m_tiles = m_tiles_of<TALL>(end - begin);
  const int m_units = (m_tiles + CM - 1) / CM;
  const int local = t - s_tiles[e];
  const int band = local / (kBandUnits * n_tiles);
  const int in_band = local - band * kBandUnits * n_tiles;
  const int band_m = min(kBandUnits, m_units - band * kBandUnits);
  const int m = (band * kBandUnits + in_band % band_m) * CM + (CM > 1 ? rank : 0);
  const int n_tile = in_band / band_m;
  Tile tile;
  tile.expert = e;
  tile.row0 = begin + m * BM;
  tile.rows = TALL && m == m_tiles - 1 ? end - tile.row0 : min(BM, end - tile.row0);  // <= 0 for an m-ghost
  tile.n0 = (n_tile * CN + (CN > 1 ? rank : 0)) * BN;
  tile.ghost = tile.n0 >= n || (CM > 1 && m >= m_tiles);
  return tile;
}

// ------------------------------------------------------------------------------------------------
// Kernel (v2, configs named V2_*). Against the first version (v1: scales read from global memory
// by the math warps, 4-byte epilogue stores, BN 128 / 256; slower on every benchmark case, see the
// README's history, and removed) it has
//   * scales through shared memory: the producer warp copies each stage's 128 a scales and 2 b
//     scales with 4-byte cp.async next to the TMA loads, so the math loop has no global loads;
//   * BN = 192 as one n192 wgmma (DeepGEMM's tile) besides 128 and 256 (two n128 slabs);
//   * "narrow" tiles at BN = 256: when a tile has <= 64 valid rows, the two warpgroups split the
//     columns (each does one slab on rows 0-63) instead of one warpgroup doing both slabs;
//   * epilogue through a dedicated smem_d (not aliased with the stages, so the producer keeps
//     prefetching the next tile): TMA store of full 64-row halves (asynchronous: the math warps go
//     straight on to the next tile), coalesced 16-byte predicated stores for expert-tail halves;
//   * PDL: launched with programmatic stream serialisation; griddepcontrol.wait before any global
//     access, so the prologue overlaps the previous kernel's tail.
// ------------------------------------------------------------------------------------------------
template <int BN_, int STAGES_, int CLUSTER_ = 1, bool SPLIT_NARROW_ = false, bool SHARE_B_ = false,
          int K_FIXED_ = 0, bool TMA_SCALES_ = false, bool TALL_ = false, int B_STAGES_ = 0,
          bool TAIL_SWAP_ = false>
struct ConfigV2 {
  static constexpr int BN = BN_, STAGES = STAGES_;
  // TALL (configs *_TALL, BN = 128): an expert's last m-tile takes up to 192 rows (m_tiles_of). Its
  // rows 128-191 are split by column between the warpgroups: each adds an m64n64 wgmma on its 64
  // columns of the tile to its m64n128 one, with a second accumulator (64 + 32 + temporaries 64 +
  // 32 registers). With ~128 rows per expert (256 experts on one GPU, realistic loads: 128 +- 11)
  // half of the experts otherwise get a second, nearly empty tile that streams the expert's
  // weights again; here every expert of 1-192 rows is one tile.
  static constexpr bool TALL = TALL_;
  // TAIL_SWAP (configs *_swap, TALL): a tail of up to 32 rows (rows 128-159) as D^T = B * A^T
  // instead: each warpgroup's m64nTN wgmma takes its 64 weight rows as the M side and the tail's
  // first TN = 16 or 32 token rows as the N side, so that a tail of a few rows costs an n16 or n32
  // instead of an n64 (realistic 256-expert loads: tails of 1-40 rows). The accumulator is then
  // transposed (rows: the warpgroup's columns, columns: tail rows); its epilogue writes it
  // transposed into smem_d. Longer tails keep the n64.
  static constexpr bool TAIL_SWAP = TAIL_SWAP_;
  static_assert(!TAIL_SWAP || TALL, "TAIL_SWAP is a TALL variant");
  // TMA_SCALES (configs *_TS): the scales come by TMA, as DeepGEMM loads them, and the producer is
  // one thread. The a scales must be MN-major (a_scales_ld > 0: element [r, kb] at kb * ld + r):
  // each stage gets the 128 tile rows' scales as one 512-B box next to A and B, so the full barrier
  // waits for one transaction count instead of 32 lanes' 4-byte cp.async. The b scales of a tile's
  // two 128-column blocks, all of K, come as one box per tile into one of two slots (their own
  // full / empty barriers), read by the math warps at each k-block. Needs K / 128 a multiple of 4
  // (16-B TMA rows) and at most kMaxKBlocksTS.
  static constexpr bool TMA_SCALES = TMA_SCALES_;
  // K_FIXED (configs *_KC): K as a compile-time constant (DeepGEMM compiles its shapes into the
  // kernel), so the k-loops have a constant trip count; 0: K at run time. A K_FIXED configuration
  // refuses any other K.
  static constexpr int K_FIXED = K_FIXED_;
  static_assert(K_FIXED % 128 == 0 && K_FIXED >= 0, "K_FIXED: 0 or a multiple of 128");
  // The math warps' k-loop unroll: 8 k-blocks (DeepGEMM's) where that divides K / 128, else 4
  // or 1 (an unroll with a remainder, K = 1536, spilled a kilobyte); a run-time K stays rolled.
  // TALL unrolls by at most 4: by 8, its second accumulator spilled ~200 B.
  static constexpr int K_UNROLL = K_FIXED / 128 % 8 == 0 && !TALL ? 8 : K_FIXED / 128 % 4 == 0 ? 4 : 1;
  // CLUSTER = 2 (configs V3_*): two CTAs on neighbouring n-tiles of one m-tile; each loads half of
  // the A tile and multicasts it to both, so A's L2 -> SM traffic halves.
  static constexpr int CLUSTER = CLUSTER_;
  static_assert(CLUSTER == 1 || CLUSTER == 2, "clusters of 1 or 2 CTAs");
  // SPLIT_NARROW (configs *_NS, BN = 192): a tile with <= 64 valid rows (an expert's tail m-tile,
  // decode) gives each warpgroup half of the columns on rows 0-63 (one m64n96 wgmma per k-step)
  // instead of leaving the second warpgroup idle, as the BN = 256 narrow tiles do with their slabs.
  static constexpr bool SPLIT_NARROW = SPLIT_NARROW_;
  static_assert(!SPLIT_NARROW || BN == 192, "split narrow tiles are written for BN = 192");
  // SHARE_B (configs V4_*, CLUSTER = 2): the cluster's CTAs take neighbouring m-tiles of one expert
  // and one n-tile instead; each loads half of the B (weight) tile and multicasts it to both.
  static constexpr bool SHARE_B = SHARE_B_;
  static_assert(!SHARE_B || CLUSTER == 2, "SHARE_B needs a cluster of 2");
  static_assert(!TALL || (BN == 128 && CLUSTER == 1 && !SPLIT_NARROW_ && !TMA_SCALES_),
                "TALL: BN = 128, one CTA per tile, no split tiles, scales by cp.async");
  // Rows of A a stage holds (TMA'd in boxes of 64 rows with TALL, as many as the tile has).
  static constexpr int A_ROWS = TALL ? BM + 64 : BM;
  // B_STAGES (configs *_b6, *_b8; 0: none): the weight tiles (B) get a ring of their own, B_STAGES
  // deep, filled by a second producer warp, next to the STAGES-deep ring of A and the scales. The
  // hypothesis these configurations measure: where the weight stream bounds the time (256 experts,
  // ~128 rows per expert) the bytes of B in flight per SM bound it, and one shared ring of TALL's
  // 40-KB stages holds only 4 x 16 KB of B, while A comes from the L2 at a fraction of the DRAM
  // latency and needs fewer stages. Both rings advance once per k-block.
  static constexpr bool SPLIT_RING = B_STAGES_ != 0;
  static constexpr int B_STAGES = SPLIT_RING ? B_STAGES_ : STAGES;
  static_assert(!SPLIT_RING || (CLUSTER == 1 && !SPLIT_NARROW_ && !TMA_SCALES_),
                "B_STAGES: one CTA per tile, no split tiles, scales by cp.async");
  static constexpr int CM = SHARE_B ? CLUSTER : 1;  // m-tiles per work unit (decode_tile)
  static constexpr int CN = SHARE_B ? 1 : CLUSTER;  // n-tiles per work unit
  static constexpr int WN = BN == 192 ? 192 : 128;  // N of one wgmma instruction ("slab")
  static constexpr int SLABS = BN / WN;
  static_assert(BN == 128 || BN == 192 || BN == 256, "BN must be 128, 192 or 256");
  static constexpr int A_BYTES = A_ROWS * BK;
  static constexpr int B_BYTES = BN * BK;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;  // multiple of 1024 for all three BN
  // Stage s of A at A_STRIDE * s, stage s of B at B_BASE + B_STRIDE * s: interleaved in one ring
  // (a stage is A then B), or with SPLIT_RING the STAGES A tiles, then the B_STAGES B tiles.
  static constexpr int A_STRIDE = SPLIT_RING ? A_BYTES : STAGE_BYTES;
  static constexpr int B_BASE = SPLIT_RING ? STAGES * A_BYTES : A_BYTES;
  static constexpr int B_STRIDE = SPLIT_RING ? B_BYTES : STAGE_BYTES;
  static constexpr int PIPE_BYTES = STAGES * A_BYTES + B_STAGES * B_BYTES;
  // smem_d: per math warpgroup, BN/64 boxes of 64 rows x 64 bf16 (128 B rows, 128B swizzle: the
  // TMA store box, and bank-conflict-free for the fragment writes and the 16-B read-back).
  static constexpr int D_BOX_BYTES = 64 * 128;
  static constexpr int D_WG_BYTES = BN / 64 * D_BOX_BYTES;
  static constexpr int D_BYTES = 2 * D_WG_BYTES;
  // Per stage: a scales of the 128 tile rows, then (cp.async path) the b scales of the tile's (up
  // to) 2 n-blocks. TMA_SCALES: the a scales alone (512 B keeps every box 128-B aligned), and after
  // the stages two per-tile slots of 2 x kMaxKBlocksTS b scales.
  static constexpr int kMaxKBlocksTS = 128;
  static_assert(!TMA_SCALES || (CLUSTER == 1 && !SPLIT_NARROW), "TMA_SCALES: one CTA, no split tiles");
  static constexpr int SC_BYTES = TMA_SCALES ? BM * 4 : A_ROWS * 4 + 16;
  static constexpr int SC_B_OFF = A_ROWS * 4;  // the b scales' byte offset in a stage's scales
  static constexpr int SC_OFF = PIPE_BYTES + D_BYTES;
  static constexpr int SB_SLOT_BYTES = 2 * kMaxKBlocksTS * 4;
  static constexpr int SB_OFF = SC_OFF + STAGES * SC_BYTES;
  static constexpr int BAR_OFF = SB_OFF + (TMA_SCALES ? 2 * SB_SLOT_BYTES : 0);
  // full, empty [, sb full x2, sb empty x2 | B full x B_STAGES, B empty x B_STAGES]
  static constexpr int NUM_BARS = 2 * STAGES + (TMA_SCALES ? 4 : 0) + (SPLIT_RING ? 2 * B_STAGES : 0);
  static constexpr int OFF_OFF = BAR_OFF + NUM_BARS * 8;
  static constexpr size_t smem_bytes(int num_experts) {
    return 1024 + OFF_OFF + 2 * (size_t)(num_experts + 1) * 4;
  }
};

__device__ __forceinline__ void cp_async_4(uint32_t dst, const float* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
// The mbarrier counts one arrival when all of this thread's earlier cp.async have landed (.noinc:
// that arrival is one of the count given at init).
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t addr) {  // addr 8-B aligned
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}
// Barrier 1 + wg over the 128 threads of math warpgroup wg (immediate ids: a register id makes
// ptxas reserve all 16 barriers).
__device__ __forceinline__ void wg_bar_sync(int wg) {
  if (wg == 0)
    asm volatile("bar.sync 1, 128;" ::: "memory");
  else
    asm volatile("bar.sync 2, 128;" ::: "memory");
}
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1)
               : "memory");
}

// Rows r and r + 8 of an accumulator fragment's 8-column chunk, as bf16 pairs, into a 128B-swizzled
// smem_d box: `addr` is row r's 4-byte slot of the chunk, row r + 8 is 8 rows of 128 B further.
__device__ __forceinline__ void st_frag_chunk(uint32_t addr, float r0a, float r0b, float r8a, float r8b) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(r0a, r0b);
  __nv_bfloat162 hi = __floats2bfloat162_rn(r8a, r8b);
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(*reinterpret_cast<uint32_t*>(&lo)) : "memory");
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr + 8 * 128), "r"(*reinterpret_cast<uint32_t*>(&hi))
               : "memory");
}

__device__ __forceinline__ void st_shared_bf16(uint32_t addr, float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  asm volatile("st.shared.b16 [%0], %1;" ::"r"(addr), "h"(*reinterpret_cast<const uint16_t*>(&h)) : "memory");
}

// A math warp is done with a stage: lane c arrives on the empty barrier of cluster rank c.
template <int CLUSTER>
__device__ __forceinline__ void release_stage(uint32_t bar_empty, int lane) {
  __syncwarp();
  if constexpr (CLUSTER > 1) {
    if (lane < CLUSTER)
      mbar_arrive_cluster(bar_empty, lane);
  } else {
    if (lane == 0)
      mbar_arrive(bar_empty);
  }
}

template <int WN, int ACCUM>
__device__ __forceinline__ void wgmma_k32(float (&d)[WN / 2], uint64_t da, uint64_t db) {
  if constexpr (WN == 128)
    wgmma_m64n128k32<ACCUM>(d, da, db);
  else
    wgmma_m64n192k32<ACCUM>(d, da, db);
}

// One k-block of a split narrow tile (SPLIT_NARROW, BN = 192): this warpgroup's 64 x 96 half of the
// tile's columns (db: its 96 B rows, 1024-aligned), promoted into acc[0..47]. `upper`: the half at
// tile columns 96-191. f**: the k-block's row x b-scale factors as the kernel names them. `half` is
// its own array: a view of the kernel's tmp registers made ptxas serialise every wgmma (C7511).
template <int CLUSTER>
__device__ __forceinline__ void split_half_kblock(float (&acc)[96], uint64_t da, uint64_t db, bool upper,
                                                  float f00, float f10, float f01, float f11, float fm0,
                                                  float fm1, uint32_t bar_empty, int lane) {
  float half[48];
  fence_regs(half);
  wgmma_fence();
  wgmma_m64n96k32<0>(half, da, db);
  wgmma_m64n96k32<1>(half, da + 2, db + 2);
  wgmma_m64n96k32<1>(half, da + 4, db + 4);
  wgmma_m64n96k32<1>(half, da + 6, db + 6);
  wgmma_commit();
  wgmma_wait0();
  fence_regs(half);
  release_stage<CLUSTER>(bar_empty, lane);
  // b-scale block by tile column, as in the kernel: the lower half has columns 0-95 (block 0, then
  // the middle chunk from 64), the upper half columns 96-191 (the middle chunk to 127, then block 1).
  const float q0[3] = {upper ? fm0 : f00, upper ? f01 : f00, upper ? f01 : fm0};
  const float q1[3] = {upper ? fm1 : f10, upper ? f11 : f10, upper ? f11 : fm1};
#pragma unroll
  for (int i = 0; i < 12; ++i) {  // 8-column chunk i of the half
    const float g0 = q0[i / 4], g1 = q1[i / 4];
    acc[4 * i + 0] = fmaf(half[4 * i + 0], g0, acc[4 * i + 0]);
    acc[4 * i + 1] = fmaf(half[4 * i + 1], g0, acc[4 * i + 1]);
    acc[4 * i + 2] = fmaf(half[4 * i + 2], g1, acc[4 * i + 2]);
    acc[4 * i + 3] = fmaf(half[4 * i + 3], g1, acc[4 * i + 3]);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1) fp8_grouped_kernel_v2(
    const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
    const __grid_constant__ CUtensorMap tmap_d, const float* __restrict__ a_scales,
    const float* __restrict__ b_scales, const int32_t* __restrict__ offsets, __nv_bfloat16* __restrict__ out,
    int* __restrict__ error_flag, int m_total, int n, int k, int num_experts,
    // TMA_SCALES only; last, so that the other configurations' parameters keep their offsets
    const __grid_constant__ CUtensorMap tmap_sa, const __grid_constant__ CUtensorMap tmap_sb) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = Cfg::BN, STAGES = Cfg::STAGES, SLABS = Cfg::SLABS, WN = Cfg::WN, CLUSTER = Cfg::CLUSTER;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t smem_d = base + Cfg::PIPE_BYTES;
  const uint32_t smem_sc = base + Cfg::SC_OFF;  // STAGES x SC_BYTES
  const uint32_t bar_full = base + Cfg::BAR_OFF;
  const uint32_t bar_empty = bar_full + STAGES * 8;
  // After them the barriers of TMA_SCALES's two b-scale slots (x2 each) or of SPLIT_RING's B ring
  // (x B_STAGES each).
  const uint32_t bar_sb_full = bar_empty + STAGES * 8, bar_sb_empty = bar_sb_full + 16;
  const uint32_t bar_full_b = bar_empty + STAGES * 8, bar_empty_b = bar_full_b + Cfg::B_STAGES * 8;
  const uint32_t smem_sb = base + Cfg::SB_OFF;               // TMA_SCALES: 2 slots
  int* s_off = reinterpret_cast<int*>(smem + Cfg::OFF_OFF);  // [E+1]
  int* s_tiles = s_off + num_experts + 1;                    // [E+1]

  const int tid = threadIdx.x;
  int warp = tid / 32, lane = tid % 32;
  constexpr int CM = Cfg::CM, CN = Cfg::CN;
  const int n_tiles = ((n + BN - 1) / BN + CN - 1) / CN;  // n-units (decode_tile)

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      // Producer lane 0's arrive_expect_tx (+ 32 cp.async arrivals when the scales are not TMA'd).
      mbar_init(bar_full + 8 * s, Cfg::TMA_SCALES ? 1 : 1 + 32);
      // One arrival per math warp of every CTA of the cluster: a stage is refilled (A, or B with
      // SHARE_B, multicast into both CTAs) only when both have consumed it.
      mbar_init(bar_empty + 8 * s, CLUSTER * kMathThreads / 32);
    }
    if constexpr (Cfg::TMA_SCALES) {
      for (int s = 0; s < 2; ++s) {
        mbar_init(bar_sb_full + 8 * s, 1);
        mbar_init(bar_sb_empty + 8 * s, kMathThreads / 32);
      }
    }
    if constexpr (Cfg::SPLIT_RING) {
      for (int s = 0; s < Cfg::B_STAGES; ++s) {
        mbar_init(bar_full_b + 8 * s, 1);  // the B producer's arrive_expect_tx
        mbar_init(bar_empty_b + 8 * s, kMathThreads / 32);
      }
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  if (warp == kMathThreads / 32 && lane == 0) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_b)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_d)) : "memory");
    if constexpr (Cfg::TMA_SCALES) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_sa)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_sb)) : "memory");
    }
  }
  // PDL: everything above overlapped the previous kernel; no global memory is touched before this
  // (a no-op when the launch has no programmatic dependency).
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // Offsets are clamped into [0, M] (an expert whose end is below its start has no rows), so corrupt
  // offsets never address memory outside the tensors; CTA 0 reports them (the sticky device-error
  // flag, as the CUTLASS configurations' setup kernel does).
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
  if (warp == 0) {                      // exclusive prefix sum of tiles per expert
    const auto units_of = [&](int e) {  // work units of expert e (decode_tile)
      return (m_tiles_of<Cfg::TALL>(max(s_off[e + 1] - s_off[e], 0)) + CM - 1) / CM * n_tiles;
    };
    const int chunk = (num_experts + 31) / 32;
    const int lo = min(lane * chunk, num_experts), hi = min(lo + chunk, num_experts);
    int sum = 0;
    for (int e = lo; e < hi; ++e)
      sum += units_of(e);
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
      run += units_of(e);
    }
    if (lane == 31)
      s_tiles[num_experts] = incl;
  }
  __syncthreads();
  // The peer's barriers are initialised before any multicast or remote arrival reaches them.
  if constexpr (CLUSTER > 1)
    cluster_sync();
  const uint32_t total_addr = base + Cfg::OFF_OFF + (2 * num_experts + 1) * 4;
  // Tile loop of this CTA: CLUSTER = 1 walks blockIdx.x += gridDim.x; a cluster walks its id.
  const auto first_tile = [] { return CLUSTER > 1 ? cluster_id() : (int)blockIdx.x; };
  const auto tile_stride = [] { return CLUSTER > 1 ? num_clusters() : (int)gridDim.x; };
  const auto my_rank = [] { return CLUSTER > 1 ? cluster_rank() : 0; };

  if (warp >= kMathThreads / 32) {
    // ---------------------------------------------------------------- producer warp
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    // One warp produces; with TMA_SCALES only its lane 0, since every copy is then a TMA.
    if (warp == kMathThreads / 32 && (!Cfg::TMA_SCALES || lane == 0)) {
      const int kb_count = k_blocks<Cfg>(k), n_blocks = opaque(n) / 128;
      int stage = 0, cursor = 0, tile_count = 0;
      uint32_t phase = 0;
      for (int t = first_tile(); t < ld_shared_s32(total_addr); t += tile_stride(), ++tile_count) {
        const int rank = my_rank();
        const Tile tile = decode_tile<BN, CN, CM, Cfg::TALL>(t, cursor, s_off, s_tiles, opaque(n), rank);
        const int b_row = tile.expert * n + tile.n0;
        if constexpr (Cfg::TMA_SCALES) {
          // The tile's b scales into slot tile_count % 2: rows n0/128 and n0/128 + 1 of the
          // expert's [N/128, K/128] (the second may be the next expert's first or past the end,
          // zero-filled: its columns are past N, never stored).
          const int slot = tile_count & 1;
          mbar_wait(bar_sb_empty + 8 * slot, ((tile_count >> 1) & 1) ^ 1);
          mbar_expect_tx(bar_sb_full + 8 * slot, 2 * kb_count * 4);
          tma_load_2d(smem_sb + slot * Cfg::SB_SLOT_BYTES, &tmap_sb, bar_sb_full + 8 * slot, 0,
                      tile.expert * n_blocks + tile.n0 / 128);
        }
        // Lane l copies the a scales of tile rows l, l+32, l+64, l+96 (rows past M clamped: never
        // stored); lanes 0 and 1 also the b scales of the tile's first and second n-block (the
        // second clamped to the expert's last n-block: then its columns are past N, never stored).
        int a_idx[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          a_idx[j] = min(tile.row0 + lane + 32 * j, m_total - 1) * kb_count;
        const int b_idx = (tile.expert * n_blocks + min(tile.n0 / 128 + lane, n_blocks - 1)) * kb_count;
        for (int kb = 0; kb < kb_count; ++kb) {
          mbar_wait(bar_empty + 8 * stage, phase ^ 1);
          const uint32_t full = bar_full + 8 * stage;
          if (lane == 0) {
            const uint32_t sa = base + stage * Cfg::A_STRIDE, sb = base + Cfg::B_BASE + stage * Cfg::B_STRIDE;
            if constexpr (Cfg::SHARE_B) {
              // Every CTA of the cluster receives the whole B tile (its own half and the peer's),
              // and its own A tile unless it is a ghost.
              constexpr int share = BN / CLUSTER;  // rows of B this CTA loads for the cluster
              mbar_expect_tx(full, (tile.ghost ? 0 : Cfg::A_BYTES) + Cfg::B_BYTES);
              if (!tile.ghost)
                tma_load_2d(sa, &tmap_a, full, kb * BK, tile.row0);
              tma_load_2d_multicast(sb + rank * share * BK, &tmap_b, full, kb * BK, b_row + rank * share,
                                    (1 << CLUSTER) - 1);
            } else {
              // Every CTA of the cluster receives the whole A tile (its own share and the peers'),
              // and its own B tile unless it is a ghost (and with TMA_SCALES the tile's a scales).
              // TALL: the tile's rows in boxes of 64 (its map's box), as many as it has (1-3).
              // SPLIT_RING: B goes into its own ring (the second producer warp, below).
              const int a_boxes = Cfg::TALL ? min(3, (tile.rows + 63) / 64) : 0;
              mbar_expect_tx(full, (Cfg::TALL ? a_boxes * 64 * BK : Cfg::A_BYTES) +
                                       (tile.ghost || Cfg::SPLIT_RING ? 0 : Cfg::B_BYTES) +
                                       (Cfg::TMA_SCALES ? BM * 4 : 0));
              if constexpr (Cfg::TALL) {
                for (int i = 0; i < a_boxes; ++i)
                  tma_load_2d(sa + i * 64 * BK, &tmap_a, full, kb * BK, tile.row0 + 64 * i);
              } else if constexpr (CLUSTER > 1) {
                constexpr int share = BM / CLUSTER;  // rows of A this CTA loads for the cluster
                tma_load_2d_multicast(sa + rank * share * BK, &tmap_a, full, kb * BK,
                                      tile.row0 + rank * share, (1 << CLUSTER) - 1);
              } else {
                tma_load_2d(sa, &tmap_a, full, kb * BK, tile.row0);
              }
              if (!tile.ghost && !Cfg::SPLIT_RING)
                tma_load_2d(sb, &tmap_b, full, kb * BK, b_row);
              // Rows past M are zero-filled; those of the next expert are loaded and never used.
              if constexpr (Cfg::TMA_SCALES)
                tma_load_2d(smem_sc + stage * Cfg::SC_BYTES, &tmap_sa, full, tile.row0, kb);
            }
          }
          if constexpr (!Cfg::TMA_SCALES) {
            const uint32_t sc = smem_sc + stage * Cfg::SC_BYTES;
#pragma unroll
            for (int j = 0; j < 4; ++j)
              cp_async_4(sc + (lane + 32 * j) * 4, a_scales + a_idx[j] + kb);
            if constexpr (Cfg::TALL) {
              // A tile's rows 128-191 (l+128, l+160), indices computed per k-block: two more held
              // indices spilled under the producer's 40 registers.
              if (tile.rows > BM) {
#pragma unroll
                for (int j = 4; j < 6; ++j)
                  cp_async_4(sc + (lane + 32 * j) * 4,
                             a_scales + (int64_t)min(tile.row0 + lane + 32 * j, m_total - 1) * kb_count + kb);
              }
            }
            if (lane < 2)
              cp_async_4(sc + Cfg::SC_B_OFF + lane * 4, b_scales + b_idx + kb);
            cp_async_arrive_noinc(full);
          }
          if (++stage == STAGES)
            stage = 0, phase ^= 1;
        }
      }
      if constexpr (CLUSTER > 1) {
        // Drain: wait until every stage's last use was released by the math warps of both CTAs.
        // The peer's arrivals land in this CTA's shared memory, which must outlive them.
        for (int i = 0; i < STAGES; ++i) {
          mbar_wait(bar_empty + 8 * stage, phase ^ 1);
          if (++stage == STAGES)
            stage = 0, phase ^= 1;
        }
      }
      asm volatile("cp.async.wait_all;" ::: "memory");  // no copy of this thread outlives it
    }
    if constexpr (Cfg::SPLIT_RING) {
      // The B producer: the same tiles and k-blocks, the weight tiles alone, into the B ring.
      if (warp == kMathThreads / 32 + 1 && lane == 0) {
        const int kb_count = k_blocks<Cfg>(k);
        int stage = 0, cursor = 0;
        uint32_t phase = 0;
        for (int t = first_tile(); t < ld_shared_s32(total_addr); t += tile_stride()) {
          const Tile tile = decode_tile<BN, CN, CM, Cfg::TALL>(t, cursor, s_off, s_tiles, opaque(n), 0);
          const int b_row = tile.expert * n + tile.n0;
          for (int kb = 0; kb < kb_count; ++kb) {
            mbar_wait(bar_empty_b + 8 * stage, phase ^ 1);
            mbar_expect_tx(bar_full_b + 8 * stage, Cfg::B_BYTES);
            tma_load_2d(base + Cfg::B_BASE + stage * Cfg::B_STRIDE, &tmap_b, bar_full_b + 8 * stage, kb * BK,
                        b_row);
            if (++stage == Cfg::B_STAGES)
              stage = 0, phase ^= 1;
          }
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
    kb_count = k_blocks<Cfg>(k);
  }
  // Warp-uniform as far as the compiler can tell (a shuffle from lane 0, as DeepGEMM does), so the
  // wgmma descriptors derived from it can live in uniform registers.
  // (Only where K is constant: the run-time-K configurations keep their measured k-loop.)
  const int wg = Cfg::K_FIXED ? __shfl_sync(0xffffffffu, warp / 4, 0) : warp / 4;
  const int rw = (warp % 4) * 16 + lane / 4;  // fragment rows rw and rw + 8 of the warpgroup's 64
  const int t_wg = (warp % 4) * 32 + lane;    // thread index inside the warpgroup
  const uint32_t d_wg = smem_d + wg * Cfg::D_WG_BYTES;

  float acc[SLABS][WN / 2];
  float tmp[WN / 2];
  // TALL: this warpgroup's 64 x 64 share of the last tile's rows 128-191 (unused elsewhere).
  constexpr int kTailRegs = Cfg::TALL ? 32 : 1;
  float acc_t[kTailRegs];
  float tmp_t[kTailRegs];
  int stage = 0, cursor = 0, tile_count = 0;
  uint32_t phase = 0;
  int stage_b = 0;  // SPLIT_RING only: the B ring's stage and phase
  uint32_t phase_b = 0;

  for (int t = first_tile(); t < ld_shared_s32(total_addr); t += tile_stride(), ++tile_count) {
    const Tile tile = decode_tile<BN, CN, CM, Cfg::TALL>(t, cursor, s_off, s_tiles, opaque(n), my_rank());
    // TMA_SCALES: this tile's b scales, [2][kb_count] in slot tile_count % 2.
    const uint32_t sb_slot = smem_sb + (tile_count & 1) * Cfg::SB_SLOT_BYTES;
    if constexpr (Cfg::TMA_SCALES)
      mbar_wait(bar_sb_full + 8 * (tile_count & 1), (tile_count >> 1) & 1);
    const int n0 = tile.n0;
    const int slabs = min(SLABS, (n - n0 + WN - 1) / WN);  // BN = 256 with N % 256 == 128: 1 slab
    // Work of this warpgroup: 64 rows from a_off, slabs [s_lo, s_hi). Narrow tile (BN = 256, <= 64
    // rows, 2 slabs): both warpgroups on rows 0-63, one slab each, so the tile takes half the time.
    const bool narrow = SLABS == 2 && slabs == 2 && tile.rows <= 64;
    // Split narrow tile (SPLIT_NARROW, BN = 192, <= 64 rows): both warpgroups on rows 0-63, warpgroup
    // w on the tile's columns [96w, 96w + 96); the second half is idle in the N tail tile (64 columns).
    const bool split = Cfg::SPLIT_NARROW && tile.rows <= 64;
    const int a_off = (narrow || split) ? 0 : wg * 64;
    const int s_lo = narrow ? wg : 0, s_hi = narrow ? wg + 1 : slabs;
    const int col_lo = split ? wg * (WN / 2) : 0;  // first tile column of a split warpgroup
    const bool active = !tile.ghost && a_off < tile.rows && (!split || n0 + col_lo < n);
    // TALL: the tile has rows 128-191 (both warpgroups are then active).
    const bool has_tail = Cfg::TALL && tile.rows > BM;
    // BN = 192: the 8-column chunks 8..15 (tile columns 64-127) use the tile's second b-scale block
    // when the tile starts in the middle of a 128-column block (n0 % 128 == 64).
    const bool mid_second = (n0 & 127) != 0;
    // That pick as a byte offset into the stage's b scales (K_FIXED: one load instead of a select
    // whose predicate the compiler rebuilt in every k-block).
    const uint32_t mid_off = mid_second ? 4 : 0;
    // K_FIXED: the low word of this warpgroup's A descriptor at stage 0, warp-uniform (shuffled
    // from lane 0) so that it can live in a uniform register; a stage adds a constant to it.
    const uint32_t da_tile =
        Cfg::K_FIXED ? __shfl_sync(0xffffffffu, (uint32_t)sw128_desc(base + a_off * BK), 0) : 0;

#pragma unroll
    for (int s = 0; s < SLABS; ++s)
#pragma unroll
      for (int i = 0; i < WN / 2; ++i)
        acc[s][i] = 0.f;
#pragma unroll
    for (int i = 0; i < kTailRegs; ++i)
      acc_t[i] = 0.f;

    // The k-loop. A constant K unrolls it (by 8 as DeepGEMM does, see K_UNROLL) and compiles it twice,
    // for an active and an idle warpgroup, so that the branch on `active` is taken once per tile
    // instead of once per k-block (DeepGEMM's loop has no such branch: it pads every expert to
    // whole tiles). A run-time K keeps one rolled loop. `tail` (TALL only, a compile-time constant
    // with either K; 0: none): the width of the wgmma on the tile's rows 128-191 beside the main
    // one, 64, or with TAIL_SWAP 16 or 32 (swapped); see tile_k_loop.
    auto k_loop = [&](auto is_active, auto tail) {
      constexpr int kTailN = decltype(tail)::value;
      constexpr bool kSwap = Cfg::TAIL_SWAP && kTailN > 0 && kTailN < 64;  // the tail as D^T
#pragma unroll Cfg::K_FIXED ? Cfg::K_UNROLL : 1
      for (int kb = 0; kb < kb_count; ++kb) {
        const uint32_t sa = base + stage * Cfg::A_STRIDE;
        // Byte `off` of this k-block's B tile.
        auto b_at = [&](uint32_t off) -> uint32_t {
          return Cfg::SPLIT_RING ? base + Cfg::B_BASE + stage_b * Cfg::B_STRIDE + off
                                 : sa + Cfg::A_BYTES + off;
        };
        const uint32_t sc = smem_sc + stage * Cfg::SC_BYTES;
        mbar_wait(bar_full + 8 * stage, phase);
        if constexpr (Cfg::SPLIT_RING)
          mbar_wait(bar_full_b + 8 * stage_b, phase_b);
        // This k-block's stages are read (every wgmma done, the scales' values used).
        auto release = [&] {
          if constexpr (Cfg::SPLIT_RING) {  // one CTA (static_assert): both arrivals local
            __syncwarp();
            if (lane == 0) {
              mbar_arrive(bar_empty + 8 * stage);
              mbar_arrive(bar_empty_b + 8 * stage_b);
            }
          } else {
            release_stage<CLUSTER>(bar_empty + 8 * stage, lane);
          }
        };
        if (is_active) {
          // Scales from the stage, combined before the wgmmas: every smem read of the stage is done
          // (its value used) before the stage is released below.
          const float sa_lo = ld_shared_f32(sc + (a_off + rw) * 4),
                      sa_hi = ld_shared_f32(sc + (a_off + rw + 8) * 4);
          const float sb0 =
              Cfg::TMA_SCALES ? ld_shared_f32(sb_slot + kb * 4) : ld_shared_f32(sc + Cfg::SC_B_OFF);
          const float sb1 = Cfg::TMA_SCALES ? ld_shared_f32(sb_slot + (kb_count + kb) * 4)
                                            : ld_shared_f32(sc + Cfg::SC_B_OFF + 4);
          // The b scale of tile columns 64-127 (BN = 192); K_FIXED loads it from the address picked
          // per tile rather than selecting it.
          const float sbm = Cfg::K_FIXED && !Cfg::TMA_SCALES && BN == 192
                                ? ld_shared_f32(sc + Cfg::SC_B_OFF + mid_off)
                                : (mid_second ? sb1 : sb0);
          const float f00 = sa_lo * sb0, f10 = sa_hi * sb0, f01 = sa_lo * sb1, f11 = sa_hi * sb1;
          const float fm0 = sa_lo * sbm, fm1 = sa_hi * sbm;
          const uint64_t da = sw128_desc(sa + a_off * BK);
          const uint32_t da_lo = da_tile + stage * (Cfg::A_STRIDE >> 4);
          // The A descriptor of k-step j (32 k of 128): K_FIXED adds to the low word only (the
          // start address never carries into the high word), so it stays a 32-bit add.
          auto da_at = [&](int j) -> uint64_t {
            return Cfg::K_FIXED ? (sw128_desc(0) & 0xFFFFFFFF00000000ull) | (da_lo + 2 * j) : da + 2 * j;
          };
          if (split) {
            if constexpr (Cfg::SPLIT_NARROW)
              split_half_kblock<CLUSTER>(acc[0], da, sw128_desc(b_at(col_lo * BK)), col_lo != 0, f00, f10,
                                         f01, f11, fm0, fm1, bar_empty + 8 * stage, lane);
          } else {
            // One slab: [s_lo, s_hi) = [0, 1) for an active warpgroup; K_FIXED drops the test.
            constexpr bool kOneSlab = SLABS == 1 && Cfg::K_FIXED;
#pragma unroll
            for (int s = 0; s < SLABS; ++s) {
              if (kOneSlab || (s >= s_lo && s < s_hi)) {
                const uint64_t db = sw128_desc(b_at(s * WN * BK));
                // A swapped tail's wgmma results (an array of its own: see wgmma_m64nNk32_tail).
                [[maybe_unused]] float tmp_s[kSwap ? kTailN / 2 : 1];
                fence_regs(tmp);
                if constexpr (Cfg::TALL)
                  fence_regs(tmp_t);
                wgmma_fence();
                wgmma_k32<WN, 0>(tmp, da_at(0), db);
                wgmma_k32<WN, 1>(tmp, da_at(1), db + 2);
                wgmma_k32<WN, 1>(tmp, da_at(2), db + 4);
                wgmma_k32<WN, 1>(tmp, da_at(3), db + 6);
                // (`if constexpr (Cfg::TALL)` on its own: the non-TALL kernels' tmp_t has one register.)
                if constexpr (Cfg::TALL) {
                  if constexpr (kTailN > 0) {
                    // Rows 128-191 x this warpgroup's 64 columns, in the same commit group.
                    const uint64_t d_tok = sw128_desc(sa + BM * BK), d_w = sw128_desc(b_at(wg * 64 * BK));
                    if constexpr (kSwap) {  // transposed: 64 weight rows x kTailN tail rows
                      fence_regs(tmp_s);
                      wgmma_m64nNk32_tail<kTailN, 0>(tmp_s, d_w, d_tok);
                      wgmma_m64nNk32_tail<kTailN, 1>(tmp_s, d_w + 2, d_tok + 2);
                      wgmma_m64nNk32_tail<kTailN, 1>(tmp_s, d_w + 4, d_tok + 4);
                      wgmma_m64nNk32_tail<kTailN, 1>(tmp_s, d_w + 6, d_tok + 6);
                    } else {
                      wgmma_m64n64k32<0>(tmp_t, d_tok, d_w);
                      wgmma_m64n64k32<1>(tmp_t, d_tok + 2, d_w + 2);
                      wgmma_m64n64k32<1>(tmp_t, d_tok + 4, d_w + 4);
                      wgmma_m64n64k32<1>(tmp_t, d_tok + 6, d_w + 6);
                    }
                  }
                }
                wgmma_commit();
                wgmma_wait0();
                fence_regs(tmp);
                // TALL: the tail's scale factors (one b block: BN = 128), by fragment row (rows rw,
                // rw + 8), read before the release and applied after it. A swapped tail's are by
                // fragment column (tail rows 8i + 2 (lane % 4) + {0, 1} of chunk i), up to 8 of
                // them: those are applied before the release instead of held (held, 16 of them made
                // ptxas spill and serialise the wgmmas).
                [[maybe_unused]] float f_t0 = 0.f, f_t1 = 0.f;  // (unused without TALL)
                if constexpr (Cfg::TALL) {
                  fence_regs(tmp_t);
                  if constexpr (kSwap) {
                    fence_regs(tmp_s);
#pragma unroll
                    for (int i = 0; i < kTailN / 8; ++i) {
                      const float2 st = ld_shared_f32x2(sc + (BM + 8 * i + 2 * (lane % 4)) * 4);
                      const float g0 = st.x * sb0, g1 = st.y * sb0;
                      acc_t[4 * i + 0] = fmaf(tmp_s[4 * i + 0], g0, acc_t[4 * i + 0]);
                      acc_t[4 * i + 1] = fmaf(tmp_s[4 * i + 1], g1, acc_t[4 * i + 1]);
                      acc_t[4 * i + 2] = fmaf(tmp_s[4 * i + 2], g0, acc_t[4 * i + 2]);
                      acc_t[4 * i + 3] = fmaf(tmp_s[4 * i + 3], g1, acc_t[4 * i + 3]);
                    }
                  } else if constexpr (kTailN > 0) {
                    f_t0 = ld_shared_f32(sc + (BM + rw) * 4) * sb0;
                    f_t1 = ld_shared_f32(sc + (BM + rw + 8) * 4) * sb0;
                  }
                }
                if (kOneSlab || s == s_hi - 1)
                  release();
                if constexpr (Cfg::TALL) {
                  if constexpr (kTailN > 0 && !kSwap) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                      acc_t[4 * i + 0] = fmaf(tmp_t[4 * i + 0], f_t0, acc_t[4 * i + 0]);
                      acc_t[4 * i + 1] = fmaf(tmp_t[4 * i + 1], f_t0, acc_t[4 * i + 1]);
                      acc_t[4 * i + 2] = fmaf(tmp_t[4 * i + 2], f_t1, acc_t[4 * i + 2]);
                      acc_t[4 * i + 3] = fmaf(tmp_t[4 * i + 3], f_t1, acc_t[4 * i + 3]);
                    }
                  }
                }
#pragma unroll
                for (int i = 0; i < WN / 8; ++i) {
                  // Column s*WN + 8i of the tile: b-scale block 0 below 64, 1 from 128, and 64-127
                  // depends on n0 % 128 (only reachable at BN = 192; at BN = 128/256 n0 % 128 == 0).
                  const int c = s * WN + 8 * i;
                  const float g0 = c >= 128 ? f01 : (c >= 64 && BN == 192) ? fm0 : f00;
                  const float g1 = c >= 128 ? f11 : (c >= 64 && BN == 192) ? fm1 : f10;
                  acc[s][4 * i + 0] = fmaf(tmp[4 * i + 0], g0, acc[s][4 * i + 0]);
                  acc[s][4 * i + 1] = fmaf(tmp[4 * i + 1], g0, acc[s][4 * i + 1]);
                  acc[s][4 * i + 2] = fmaf(tmp[4 * i + 2], g1, acc[s][4 * i + 2]);
                  acc[s][4 * i + 3] = fmaf(tmp[4 * i + 3], g1, acc[s][4 * i + 3]);
                }
              }
            }
          }
        } else {
          release();
        }
        if (++stage == STAGES)
          stage = 0, phase ^= 1;
        if constexpr (Cfg::SPLIT_RING) {
          if (++stage_b == Cfg::B_STAGES)
            stage_b = 0, phase_b ^= 1;
        }
      }
    };
    // The tile's k-loop, with the tail's width at compile time (a run-time test around the tail's
    // wgmmas made ptxas serialise them, C7520): none, the n64, or with TAIL_SWAP a swapped n16 / n32
    // where the tail's rows fit (above 32 rows the n64 as without TAIL_SWAP: a swapped n64 costs
    // the same and its 16 scale factors per k-block spilled). A tile with a tail has both
    // warpgroups active.
    auto tile_k_loop = [&](auto is_active) {
      if constexpr (Cfg::TALL) {
        if (has_tail) {
          if constexpr (Cfg::TAIL_SWAP) {
            const int tail_rows = tile.rows - BM;
            if (tail_rows <= 16)
              return k_loop(is_active, std::integral_constant<int, 16>{});
            if (tail_rows <= 32)
              return k_loop(is_active, std::integral_constant<int, 32>{});
          }
          return k_loop(is_active, std::integral_constant<int, 64>{});
        }
      }
      k_loop(is_active, std::integral_constant<int, 0>{});
    };
    if constexpr (Cfg::K_FIXED) {
      if (active)
        tile_k_loop(std::true_type{});
      else  // (no tail: its tiles have both warpgroups active)
        k_loop(std::false_type{}, std::integral_constant<int, 0>{});
    } else {
      tile_k_loop(active);
    }
    if constexpr (Cfg::TMA_SCALES)  // every read of the slot was used by the promotions above
      release_stage<1>(bar_sb_empty + 8 * (tile_count & 1), lane);

    // Expert tail: rows past rows_valid belong to the next expert (another CTA may be writing them):
    // 16-B stores of the valid rows of this warpgroup's smem_d only, coalesced along the row.
    auto store_valid_rows = [&](int row0, int col0, int rows_valid, int cols_valid) {
      const int cpr = cols_valid / 8;  // 16-B chunks per row (cols_valid is a multiple of 32)
      for (int idx = t_wg; idx < rows_valid * cpr; idx += 128) {
        const int r = idx / cpr, c = idx - r * cpr;
        const uint32_t src = d_wg + (c / 8) * Cfg::D_BOX_BYTES + r * 128 + (((c % 8) ^ (r % 8)) * 16);
        uint32_t v0, v1, v2, v3;
        asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3)
                     : "r"(src)
                     : "memory");
        __nv_bfloat16* dst = out + (int64_t)(row0 + r) * n + col0 + c * 8;
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(v0), "r"(v1), "r"(v2), "r"(v3)
                     : "memory");
      }
    };
    // Before this warpgroup writes its smem_d: the TMA stores issued from it have read it.
    auto await_smem_d = [&] {
      if (t_wg == 0)
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      wg_bar_sync(wg);
    };
    // After: rows [row0, +rows_valid) x columns [col0, +cols_valid) staged in smem_d's boxes go out,
    // by TMA (asynchronous; clips at N and M) when `whole_boxes` and all 64 rows belong to the
    // expert, else with store_valid_rows.
    auto store_smem_d = [&](int row0, int col0, int rows_valid, int cols_valid, bool whole_boxes) {
      // Generic-proxy writes -> visible to the TMA (async proxy) store.
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      wg_bar_sync(wg);
      if (rows_valid == 64 && whole_boxes) {
        if (t_wg == 0) {
          for (int b = 0; b * 64 < cols_valid; ++b)
            tma_store_2d(&tmap_d, d_wg + b * Cfg::D_BOX_BYTES, col0 + b * 64, row0);
          asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
      } else {
        store_valid_rows(row0, col0, rows_valid, cols_valid);
      }
    };
    // Epilogue of this warpgroup: rows [row0 + a_off, +64) x columns [col0, +ncols), through
    // its own smem_d region (box b = local columns 64b..64b+63). Only this warpgroup touches that
    // region, so 128-thread named barriers (ids 1 and 2) suffice.
    if (active) {
      const int rows_valid = min(64, tile.rows - a_off);
      const int col0 = n0 + s_lo * WN + col_lo;
      const int ncols = split ? WN / 2 : (s_hi - s_lo) * WN;
      const int cols_valid = min(ncols, n - col0);
      await_smem_d();  // the previous tile's stores
      // The addresses are derived from `opaque` values here: otherwise the compiler hoists all
      // WN/8 of them out of the tile loop and keeps them live across the mainloop (spills at BN >= 192).
      const int sw = opaque(lane / 4);  // = row % 8 for rows rw and rw + 8
      const uint32_t row_addr = d_wg + opaque(rw * 128 + (lane % 4) * 4);
#pragma unroll
      for (int s = 0; s < SLABS; ++s) {
        if (s >= s_lo && s < s_hi) {
          const uint32_t slab_base = row_addr + (s - s_lo) * (WN / 64) * Cfg::D_BOX_BYTES;
#pragma unroll
          for (int i = 0; i < WN / 8; ++i) {
            if (split && i >= WN / 16)  // a split warpgroup holds 96 columns
              break;
            // 16-B chunk i % 8 of rows rw and rw + 8 of box i / 8, XOR-swizzled with row % 8
            const uint32_t addr = slab_base + (i / 8) * Cfg::D_BOX_BYTES + (((i % 8) ^ sw) * 16);
            st_frag_chunk(addr, acc[s][4 * i + 0], acc[s][4 * i + 1], acc[s][4 * i + 2], acc[s][4 * i + 3]);
          }
        }
      }
      // (A split half's 96 columns are not a whole number of 64-column boxes.)
      store_smem_d(tile.row0 + a_off, col0, rows_valid, cols_valid, !split);
    }
    if constexpr (Cfg::TALL) {
      // TALL: rows 128 .. rows-1 of the tile x this warpgroup's 64 columns, through box 0 of its
      // smem_d once the store above has read it (the ordering of the main part's epilogue).
      if (has_tail) {
        const int rows_t = tile.rows - BM;
        await_smem_d();  // the main part's stores
        if (Cfg::TAIL_SWAP && rows_t <= 32) {
          // Transposed (tail_k_loop swaps tails of up to 32 rows): [4i + q] is tail row
          // 8i + 2 (lane % 4) + q of column rw, [4i + 2 + q] of column rw + 8, i < 4; bf16 by bf16
          // into the swizzled box, whose rows 0-31 store_valid_rows then reads. The addresses come
          // from `opaque` values, as the main epilogue's: else hoisted out of the tile loop.
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int t0 = opaque(2 * (lane % 4) + q);  // the thread's tail row in chunk 0; t0 % 8 == t0
            const uint32_t lo = d_wg + opaque(t0 * 128 + (rw % 8) * 2 + (((rw / 8) ^ t0) * 16));
            const uint32_t hi = d_wg + opaque(t0 * 128 + (rw % 8) * 2 + (((rw / 8 + 1) ^ t0) * 16));
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // tail row t0 + 8i: 8 rows of 128 B further, same swizzle
              st_shared_bf16(lo + i * 8 * 128, acc_t[4 * i + q]);
              st_shared_bf16(hi + i * 8 * 128, acc_t[4 * i + 2 + q]);
            }
          }
        } else {
          const int sw = opaque(lane / 4);
          const uint32_t row_addr = d_wg + opaque(rw * 128 + (lane % 4) * 4);
#pragma unroll
          for (int i = 0; i < 8; ++i)
            st_frag_chunk(row_addr + ((i ^ sw) * 16), acc_t[4 * i + 0], acc_t[4 * i + 1], acc_t[4 * i + 2],
                          acc_t[4 * i + 3]);
        }
        store_smem_d(tile.row0 + BM, n0 + 64 * wg, rows_t, 64, true);
      }
    }
    // Outstanding TMA stores must be complete before the CTA (and its smem_d) goes away. Done on the
    // CTA's last tile inside the loop: any code after the tile loop makes ptxas cap this region
    // below the 232 registers of setmaxnreg (~400 B of spills at BN >= 192).
    if (t + tile_stride() >= ld_shared_s32(total_addr) && t_wg == 0)
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
inline PFN_cuTensorMapEncodeTiled_v12000 get_encode_fn() {
  // Through the runtime's entry-point query: no -lcuda needed at link time.
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// One 2-D tensor map: [rows, cols] of `dtype` with rows `row_bytes` apart (a multiple of 16), box
// {box_cols, box_rows}, zero fill out of bounds. Every map of this kernel and the BF16 one.
inline bool encode_map_2d(CUtensorMap* map, CUtensorMapDataType dtype, const void* ptr, uint64_t rows,
                          uint64_t cols, uint64_t row_bytes, uint32_t box_cols, uint32_t box_rows,
                          CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion) {
  auto encode = get_encode_fn();
  if (!encode)
    return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t estr[2] = {1, 1};
  return encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, estr,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promotion,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// 2-D e4m3 map [rows, k] (k contiguous), box {128 (k), box_rows}, 128B swizzle.
inline bool make_map(CUtensorMap* map, const void* ptr, uint64_t rows, uint64_t k, uint32_t box_rows) {
  return encode_map_2d(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, ptr, rows, k, k, BK, box_rows,
                       CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

// bf16 [m, n] output map for the v2 TMA store: box {64 columns (128 B), 64 rows}, 128B swizzle.
inline bool make_map_d(CUtensorMap* map, void* ptr, uint64_t m, uint64_t n) {
  return encode_map_2d(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, ptr, m, n, n * 2, 64, 64,
                       CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE);
}

// fp32 scales [rows, cols] with row stride ld elements (a multiple of 4), no swizzle: the maps of the
// TMA_SCALES configurations.
inline bool make_map_f32(CUtensorMap* map, const float* ptr, uint64_t rows, uint64_t cols, uint64_t ld,
                         uint32_t box_cols, uint32_t box_rows) {
  return encode_map_2d(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, ptr, rows, cols, ld * 4, box_cols, box_rows,
                       CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE);
}

// Whether a TMA_SCALES configuration takes these scales: MN-major a scales (a_scales_ld >= M, a
// multiple of 4), K / 128 a multiple of 4 and at most kMaxKBlocksTS, 16-B aligned pointers.
template <class Cfg>
inline bool tma_scales_supported(const float* a_scales, const float* b_scales, int64_t m_total, int k,
                                 int64_t a_scales_ld) {
  const int kb = k / BK;
  return a_scales_ld >= m_total && a_scales_ld % 4 == 0 && kb % 4 == 0 && kb <= Cfg::kMaxKBlocksTS &&
         reinterpret_cast<uintptr_t>(a_scales) % 16 == 0 && reinterpret_cast<uintptr_t>(b_scales) % 16 == 0;
}

// Whether the kernel takes this problem: n, k positive multiples of 128, 1 <= E <= kMaxExperts (the
// offsets and tile prefix live in shared memory), the 32-bit scale indices and tile numbers cannot
// overflow (the latter only with an output far beyond any GPU's memory), and `out` is 16-byte
// aligned (TMA store, 16-B stores).
inline bool fp8_grouped_supports(int64_t m_total, int64_t n, int64_t k, int64_t num_experts,
                                 const void* out) {
  return n > 0 && k > 0 && n % 128 == 0 && k % 128 == 0 && num_experts >= 1 && num_experts <= kMaxExperts &&
         m_total >= 0 && m_total * (k / 128) < (1ll << 31) && num_experts * n * (k / 128) < (1ll << 31) &&
         (m_total / BM + num_experts) * (n / 128) < (1ll << 31) && reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// What a launch of a kernel needs to know about the device, asked once per thread and device (Tag:
// one cache per kernel, its configuration type): the kernel's shared-memory limit is raised to
// `smem` (the most any E needs), and the number of work units (CTAs, or clusters of `cluster`) that
// can be resident at once (clusters of 2 may not fill every SM: a GPC with an odd number of SMs).
// `static` (internal linkage) on purpose: the cache of a function with external linkage is one
// STB_GNU_UNIQUE object per process, shared with every other extension that includes this header
// (the prototypes, say), whose own copy of the kernel had its shared-memory limit raised instead of
// ours: our launch then failed with cudaErrorInvalidValue (measured, seventh session's variants).
template <class Tag>
static int resident_units(const void* kernel, int cluster, int threads, int smem, int device, int num_sms) {
  constexpr int kMaxDevices = 64;
  thread_local int cached[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices && cached[device] > 0)
    return cached[device];
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return -1;
  int units = num_sms / cluster;
  if (cluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(units * cluster);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaOccupancyMaxActiveClusters(&units, kernel, &cfg) != cudaSuccess || units < 1)
      return -1;
  }
  if (device >= 0 && device < kMaxDevices)
    cached[device] = units;
  return units;
}

// out[rows of e] = (a * a_scales)[rows of e] @ (b[e] * b_scales[e])^T for the problem of
// fp8_grouped_supports (else cudaErrorInvalidValue). The launch depends only on host-known sizes
// (graph-capturable; the offsets are read on the device). error_flag: the sticky device-error flag,
// set when the offsets are not non-decreasing within [0, m_total] (or nullptr). With `pdl`, the
// grid may start (barrier init, tensormap prefetch) while the previous kernel of the stream drains;
// the kernel waits on griddepcontrol.wait before touching global memory. a_scales_ld: 0 for K-major a
// scales ([M, K/128] contiguous), else the row stride of MN-major ones ([K/128][ld]), which only the
// TMA_SCALES configurations take (and need).
template <class Cfg>
cudaError_t fp8_grouped_run(const void* a, const float* a_scales, const void* b, const float* b_scales,
                            const int32_t* offsets, void* out, int* error_flag, int64_t m_total, int n, int k,
                            int num_experts, int device, int num_sms, bool pdl, cudaStream_t stream,
                            int64_t a_scales_ld = 0) {
  if (!fp8_grouped_supports(m_total, n, k, num_experts, out) || (Cfg::K_FIXED && k != Cfg::K_FIXED) ||
      (Cfg::TMA_SCALES ? !tma_scales_supported<Cfg>(a_scales, b_scales, m_total, k, a_scales_ld)
                       : a_scales_ld != 0))
    return cudaErrorInvalidValue;
  if (m_total == 0)
    return cudaSuccess;
  CUtensorMap map_a, map_b, map_d;
  // Box rows: the share of the multicast operand a CTA loads (A's rows unless SHARE_B, else B's);
  // TALL loads A in boxes of 64 rows.
  if (!make_map(&map_a, a, (uint64_t)m_total, (uint64_t)k, Cfg::TALL ? 64 : BM / Cfg::CN) ||
      !make_map(&map_b, b, (uint64_t)num_experts * n, (uint64_t)k, Cfg::BN / Cfg::CM) ||
      !make_map_d(&map_d, out, (uint64_t)m_total, (uint64_t)n))
    return cudaErrorInvalidValue;
  CUtensorMap map_sa = {}, map_sb = {};  // unused (zero) unless TMA_SCALES
  if constexpr (Cfg::TMA_SCALES) {
    const uint32_t kb = k / BK;
    if (!make_map_f32(&map_sa, a_scales, kb, (uint64_t)m_total, (uint64_t)a_scales_ld, BM, 1) ||
        !make_map_f32(&map_sb, b_scales, (uint64_t)num_experts * (n / 128), kb, kb, kb, 2))
      return cudaErrorInvalidValue;
  }
  constexpr int C = Cfg::CLUSTER;
  const int resident = resident_units<Cfg>(reinterpret_cast<const void*>(fp8_grouped_kernel_v2<Cfg>), C,
                                           kThreads, (int)Cfg::smem_bytes(kMaxExperts), device, num_sms);
  if (resident < 1)
    return cudaErrorInvalidConfiguration;
  // Persistent grid of work units (CM m-tiles x CN n-tiles, one tile per CTA of a cluster): as many
  // as can be resident, at most the host-known bound on the units (an expert of r rows has
  // ceil(ceil(r / BM) / CM) <= r / (BM * CM) + 1 m-units).
  const int64_t n_units = ((n + Cfg::BN - 1) / Cfg::BN + Cfg::CN - 1) / Cfg::CN;
  const int64_t max_units = (m_total / (BM * Cfg::CM) + num_experts) * n_units;
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
  cfg.numAttrs = C > 1 ? 2 : 1;  // one CTA: a plain launch, no cluster attribute
  const cudaError_t err = cudaLaunchKernelEx(&cfg, fp8_grouped_kernel_v2<Cfg>, map_a, map_b, map_d, a_scales,
                                             b_scales, offsets, static_cast<__nv_bfloat16*>(out), error_flag,
                                             (int)m_total, n, k, num_experts, map_sa, map_sb);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// The variants (prototypes/fp8_grouped_gemm benchmarks them all). Stage counts: as many as fit next
// to smem_d in 227 KB with up to 1024 experts.
using CfgV2_128x5 = ConfigV2<128, 5>;
using CfgV2_192x4 = ConfigV2<192, 4>;
using CfgV2_256x3 = ConfigV2<256, 3>;
using CfgV3_128x5 = ConfigV2<128, 5, 2>;
using CfgV3_192x4 = ConfigV2<192, 4, 2>;
using CfgV3_256x3 = ConfigV2<256, 3, 2>;
using CfgV2_192x4_NS = ConfigV2<192, 4, 1, true>;
using CfgV3_192x4_NS = ConfigV2<192, 4, 2, true>;
using CfgV4_192x4 = ConfigV2<192, 4, 2, false, true>;
using CfgV4_192x4_NS = ConfigV2<192, 4, 2, true, true>;
template <int K>
using CfgV2_192x4_K = ConfigV2<192, 4, 1, false, false, K>;
using CfgV2_192x4_TS = ConfigV2<192, 4, 1, false, false, 0, true>;
template <int K>
using CfgV3_192x4_K = ConfigV2<192, 4, 2, false, false, K>;
template <int K>
using CfgV4_192x4_K = ConfigV2<192, 4, 2, false, true, K>;
template <int K>
using CfgV2_192x4_K_TS = ConfigV2<192, 4, 1, false, false, K, true>;
using CfgV2_128x4_TALL = ConfigV2<128, 4, 1, false, false, 0, false, true>;
template <int K>
using CfgV2_128x4_K_TALL = ConfigV2<128, 4, 1, false, false, K, false, true>;
// TALL with its weight tiles in a ring of their own: 3 stages of A (24 KB) and 6 of B (16 KB; 7
// would leave 0.5 KB too little for 1024 experts), or 2 of A and 8 of B (A from the L2 one k-block
// ahead of the math warps).
using CfgV2_128x3_TALL_B6 = ConfigV2<128, 3, 1, false, false, 0, false, true, 6>;
template <int K>
using CfgV2_128x3_K_TALL_B6 = ConfigV2<128, 3, 1, false, false, K, false, true, 6>;
using CfgV2_128x2_TALL_B8 = ConfigV2<128, 2, 1, false, false, 0, false, true, 8>;
template <int K>
using CfgV2_128x2_K_TALL_B8 = ConfigV2<128, 2, 1, false, false, K, false, true, 8>;
// b6 with tails of up to 32 rows swapped (TAIL_SWAP: an n16 or n32 instead of the n64).
using CfgV2_128x3_TALL_B6_SWAP = ConfigV2<128, 3, 1, false, false, 0, false, true, 6, true>;
template <int K>
using CfgV2_128x3_K_TALL_B6_SWAP = ConfigV2<128, 3, 1, false, false, K, false, true, 6, true>;
static_assert(CfgV2_128x5::smem_bytes(kMaxExperts) <= 232448 &&
                  CfgV2_192x4_TS::smem_bytes(kMaxExperts) <= 232448 &&
                  CfgV2_192x4::smem_bytes(kMaxExperts) <= 232448 &&
                  CfgV2_256x3::smem_bytes(kMaxExperts) <= 232448 &&
                  CfgV2_128x4_TALL::smem_bytes(kMaxExperts) <= 232448 &&
                  CfgV2_128x3_TALL_B6::smem_bytes(kMaxExperts) <= 232448 &&
                  CfgV2_128x2_TALL_B8::smem_bytes(kMaxExperts) <= 232448,
              "shared memory over the sm_90 limit");

}  // namespace fp8g
}  // namespace moe_kernels
