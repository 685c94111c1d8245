// CUTLASS 3.x Hopper grouped ("pointer-array") GEMMs for MoE experts, with every per-expert argument
// written on the device from expert_offsets: no host sync, CUDA-graph capturable.
//
//   Forward: out[rows of e] = a[rows of e] @ b[e]^T,  rows of e = [offsets[e], offsets[e+1])
//     a: [M, K] row-major (K contiguous), b: [E, N, K] (K contiguous), out: [M, N] bf16 row-major.
//     FP8: e4m3 operands with fp32 scales, a 1x128 ([M, K/128], K-major), b 128x128
//     ([E, N/128, K/128], K-major), applied to the fp32 accumulators after every 128 of K.
//   Dgrad (BF16): the same with b [E, K, N] read untransposed (grad_a = grad_out @ w[e]).
//   Wgrad: grouped along the reduction, out[e] = grad[rows of e]^T @ act[rows of e] (WgradProblem).
//
// Each (config, kind) is instantiated in its own .cu so they build in parallel.
// Framework-free: raw pointers and sizes in, cutlass::Status out.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "moe_kernels/device_error.cuh"
#include "moe_kernels/grouped_gemm.h"

namespace moe_kernels {
namespace gemm {

using namespace cute;

// Tile configurations. Cooperative: two consumer warpgroups share one 128-row tile (large M per
// expert). Pingpong: two consumer warpgroups alternate 64-row tiles, overlapping one tile's
// epilogue with the other's MMAs (few rows per expert). Cluster 1x2: the two CTAs of a cluster
// compute neighbouring N tiles of the same rows and share the A tile by TMA multicast.
struct Fp8Cooperative128x128 {
  using Element = cutlass::float_e4m3_t;
  using Tile = Shape<_128, _128, _128>;
  using Cluster = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr bool kBlockwise = true;
};

struct Fp8Pingpong64x128 {
  using Element = cutlass::float_e4m3_t;
  using Tile = Shape<_64, _128, _128>;
  using Cluster = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  static constexpr bool kBlockwise = true;
};

struct Bf16Cooperative128x128 {
  using Element = cutlass::bfloat16_t;
  using Tile = Shape<_128, _128, _64>;
  using Cluster = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr bool kBlockwise = false;
};

struct Bf16Cooperative128x256 {
  using Element = cutlass::bfloat16_t;
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr bool kBlockwise = false;
};

struct Bf16Pingpong64x256 {  // the wgrad's short reductions: epilogues overlap the other tile's MMAs
  using Element = cutlass::bfloat16_t;
  using Tile = Shape<_64, _256, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  static constexpr bool kBlockwise = false;
};

struct Bf16Pingpong64x128 {
  using Element = cutlass::bfloat16_t;
  using Tile = Shape<_64, _128, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  static constexpr bool kBlockwise = false;
};

// What a GEMM computes: its operands' layouts (in CUTLASS's M x K / N x K terms), its output type, the
// problem it is given and the scales' granularity along N (1 row per scale for A, always).
struct Forward {  // a [M, K] and b[e] [N, K], both K contiguous; 128x128 weight blocks
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using ElementD = cutlass::bfloat16_t;
  using Problem = GroupedGemmProblem;
  static constexpr int kScaleN = 128;
  static constexpr GMMA::Major kScaleMajor = GMMA::Major::K;
  static constexpr bool kWgrad = false;
};

struct Dgrad {  // b[e] [K, N] read as the B operand N x K with N contiguous (BF16 only)
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::RowMajor;
  using ElementD = cutlass::bfloat16_t;
  using Problem = GroupedGemmProblem;
  static constexpr int kScaleN = 128;
  static constexpr GMMA::Major kScaleMajor = GMMA::Major::K;
  static constexpr bool kWgrad = false;
};

// BF16 wgrad: A = grad[rows]^T (N x rows, N contiguous), B = act[rows] (K x rows, K contiguous).
template <class D>
struct WgradBf16 {
  using LayoutA = cutlass::layout::ColumnMajor;
  using LayoutB = cutlass::layout::RowMajor;
  using ElementD = D;
  using Problem = WgradProblem;
  static constexpr int kScaleN = 128;
  static constexpr GMMA::Major kScaleMajor = GMMA::Major::K;
  static constexpr bool kWgrad = true;
};

// FP8 wgrad: both operands transposed per expert (reduction contiguous, as FP8 wgmma needs), each
// row with its own scale per 128 of the reduction; scales stored [R/128, rows] (MN-major), which
// is what the transposing quantiser writes with coalesced stores and the mainloop loads in lines.
template <class D>
struct WgradFp8 {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using ElementD = D;
  using Problem = WgradProblem;
  static constexpr int kScaleN = 1;
  static constexpr GMMA::Major kScaleMajor = GMMA::Major::MN;
  static constexpr bool kWgrad = true;
};

template <class Config, class Kind = Forward>
struct GroupedGemm {
  using Element = typename Config::Element;
  using ElementD = typename Kind::ElementD;
  using LayoutA = typename Kind::LayoutA;
  using LayoutB = typename Kind::LayoutB;
  using LayoutD = cutlass::layout::RowMajor;
  using Problem = typename Kind::Problem;
  static constexpr int kAlignment = 16 / sizeof(Element);
  static constexpr int kAlignmentD = 16 / sizeof(ElementD);
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<1, Kind::kScaleN, 128, Kind::kScaleMajor, Kind::kScaleMajor>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignmentD, ElementD,
      LayoutD*, kAlignmentD, typename Config::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using OperandA = cute::conditional_t<Config::kBlockwise, cute::tuple<LayoutA*, LayoutSFA*>, LayoutA*>;
  using OperandB = cute::conditional_t<Config::kBlockwise, cute::tuple<LayoutB*, LayoutSFB*>, LayoutB*>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, OperandA, kAlignment, Element, OperandB,
      kAlignment, float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // The per-expert argument arrays, carved out of one device buffer.
  struct DeviceArgs {
    typename ProblemShape::UnderlyingProblemShape* problem_sizes;
    const Element** ptr_a;
    const Element** ptr_b;
    ElementD** ptr_d;
    const float** ptr_sfa;
    const float** ptr_sfb;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    LayoutSFA* layout_sfa;
    LayoutSFB* layout_sfb;
  };

  static size_t args_bytes(int num_experts) {
    const size_t per_expert = sizeof(typename ProblemShape::UnderlyingProblemShape) + 5 * sizeof(void*) +
                              sizeof(StrideA) + sizeof(StrideB) + sizeof(StrideD) + sizeof(LayoutSFA) +
                              sizeof(LayoutSFB);
    // Rounded to 256 bytes: CUTLASS's workspace follows and holds TMA descriptors (128-byte aligned).
    return ((per_expert + 16) * num_experts + 11 * 16 + 255) / 256 * 256;
  }

  static DeviceArgs carve(void* buffer, int num_experts) {
    char* cursor = static_cast<char*>(buffer);
    auto take = [&](size_t bytes) {
      char* p = cursor;
      cursor += (bytes * num_experts + 15) / 16 * 16;
      return p;
    };
    DeviceArgs d;
    d.problem_sizes = reinterpret_cast<decltype(d.problem_sizes)>(
        take(sizeof(typename ProblemShape::UnderlyingProblemShape)));
    d.ptr_a = reinterpret_cast<const Element**>(take(sizeof(void*)));
    d.ptr_b = reinterpret_cast<const Element**>(take(sizeof(void*)));
    d.ptr_d = reinterpret_cast<ElementD**>(take(sizeof(void*)));
    d.ptr_sfa = reinterpret_cast<const float**>(take(sizeof(void*)));
    d.ptr_sfb = reinterpret_cast<const float**>(take(sizeof(void*)));
    d.stride_a = reinterpret_cast<StrideA*>(take(sizeof(StrideA)));
    d.stride_b = reinterpret_cast<StrideB*>(take(sizeof(StrideB)));
    d.stride_d = reinterpret_cast<StrideD*>(take(sizeof(StrideD)));
    d.layout_sfa = reinterpret_cast<LayoutSFA*>(take(sizeof(LayoutSFA)));
    d.layout_sfb = reinterpret_cast<LayoutSFB*>(take(sizeof(LayoutSFB)));
    return d;
  }

  static typename Gemm::Arguments arguments(const Problem& p, const DeviceArgs& d, int sm_count) {
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = p.device;
    hw_info.sm_count = sm_count;
    typename CollectiveMainloop::Arguments mainloop;
    if constexpr (Config::kBlockwise) {
      mainloop = {d.ptr_a, d.stride_a, d.ptr_b, d.stride_b, d.ptr_sfa, d.layout_sfa, d.ptr_sfb, d.layout_sfb};
    } else {
      mainloop = {d.ptr_a, d.stride_a, d.ptr_b, d.stride_b};
    }
    typename CollectiveEpilogue::Arguments epilogue{{}, nullptr, d.stride_d, d.ptr_d, d.stride_d};
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = 0.0f;
    // Host problem shapes stay null: the shapes exist only on the device.
    return {cutlass::gemm::GemmUniversalMode::kGrouped,
            {p.num_experts, d.problem_sizes, nullptr},
            mainloop,
            epilogue,
            hw_info};
  }

  // Bytes of device workspace run() needs: the argument arrays plus CUTLASS's own (TMA descriptors).
  static size_t workspace_bytes(const Problem& p, int sm_count) {
    const DeviceArgs none{};
    return args_bytes(p.num_experts) + 256 + Gemm::get_workspace_size(arguments(p, none, sm_count));
  }

  static cudaError_t run(const Problem& p, void* workspace, int sm_count, cudaStream_t stream);
};

// Fills the per-expert arrays from the offsets. Offsets are clamped into [0, M] and made
// non-decreasing, so corrupt offsets can never address memory outside a, out or the scales; such
// offsets are reported through the sticky device-error flag (thread e checks offsets[e..e+1]).
template <class G>
__global__ void setup_grouped_args(GroupedGemmProblem p, typename G::DeviceArgs d) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.num_experts) {
    return;
  }
  const int64_t first = p.expert_offsets[e], last = p.expert_offsets[e + 1];
  if (first < 0 || last < first || last > p.m_total) {
    report_device_error(p.error_flag, kGroupedGemmBadOffsets);
  }
  const int64_t lo = min(max(first, int64_t(0)), p.m_total);
  const int64_t hi = min(max(last, lo), p.m_total);
  const int m = static_cast<int>(hi - lo), n = p.n, k = p.k;
  d.problem_sizes[e] = {m, n, k};
  d.ptr_a[e] = static_cast<const typename G::Element*>(p.a) + lo * k;
  d.ptr_b[e] = static_cast<const typename G::Element*>(p.b) + int64_t(e) * n * k;
  d.ptr_d[e] = static_cast<typename G::ElementD*>(p.out) + lo * n;
  d.stride_a[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k, 1});
  d.stride_b[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1});
  d.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, n, 1});
  if (p.a_scales != nullptr) {
    d.ptr_sfa[e] = p.a_scales + lo * (k / 128);
    d.ptr_sfb[e] = p.b_scales + int64_t(e) * (n / 128) * (k / 128);
    d.layout_sfa[e] = G::ScaleConfig::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
    d.layout_sfb[e] = G::ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
  }
}

// The wgrad's per-expert arguments. Offsets are clamped and reported as in setup_grouped_args. An
// expert without rows gets an empty problem (no tiles) and zeros from zero_empty_experts.
template <class G>
__global__ void setup_wgrad_args(WgradProblem p, typename G::DeviceArgs d) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.num_experts) {
    return;
  }
  const int64_t first = p.expert_offsets[e], last = p.expert_offsets[e + 1];
  if (first < 0 || last < first || last > p.m_total) {
    report_device_error(p.error_flag, kGroupedGemmBadOffsets);
  }
  const int64_t lo = min(max(first, int64_t(0)), p.m_total);
  const int64_t hi = min(max(last, lo), p.m_total);
  const int rows = static_cast<int>(hi - lo), n = p.n, k = p.k;
  // No tiles for an empty expert; its reduction length stays positive for the descriptors' sake.
  d.problem_sizes[e] = {rows > 0 ? n : 0, k, rows > 0 ? rows : 128};
  d.ptr_d[e] = static_cast<typename G::ElementD*>(p.out) + int64_t(e) * n * k;
  d.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {n, k, 1});
  const auto* grad = static_cast<const typename G::Element*>(p.grad);
  const auto* act = static_cast<const typename G::Element*>(p.act);
  if (p.grad_scales == nullptr) {  // BF16: the forward's row-major rows, read transposed
    d.ptr_a[e] = grad + lo * n;
    d.ptr_b[e] = act + lo * k;
    d.stride_a[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {n, rows, 1});
    d.stride_b[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {k, rows, 1});
    return;
  }
  // FP8: expert e's compact blocks [n, rows] and [k, rows], scales [rows / 128, n] and [rows / 128, k].
  if (rows % 128 != 0) {
    report_device_error(p.error_flag, kGroupedGemmBadOffsets);
    d.problem_sizes[e] = {0, k, 128};
  }
  d.ptr_a[e] = grad + lo * n;
  d.ptr_b[e] = act + lo * k;
  d.stride_a[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {n, rows, 1});
  d.stride_b[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {k, rows, 1});
  d.ptr_sfa[e] = p.grad_scales + lo / 128 * n;
  d.ptr_sfb[e] = p.act_scales + lo / 128 * k;
  d.layout_sfa[e] = G::ScaleConfig::tile_atom_to_shape_SFA(make_shape(n, k, rows, 1));
  d.layout_sfb[e] = G::ScaleConfig::tile_atom_to_shape_SFB(make_shape(n, k, rows, 1));
}

// Zeros the gradient of every expert without rows (the GEMM gives such an expert no tiles).
template <class T>
__global__ void zero_empty_experts(WgradProblem p) {
  const int e = blockIdx.y;
  const int32_t first = p.expert_offsets[e], last = p.expert_offsets[e + 1];
  if (last > first && first >= 0 && last <= p.m_total) {
    return;
  }
  const int64_t size = int64_t(p.n) * p.k;  // a multiple of 128 * 128: whole 16-byte vectors
  constexpr int kVec = 16 / sizeof(T);
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + e * size);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < size / kVec;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = make_uint4(0, 0, 0, 0);
  }
}

template <class Config, class Kind>
cudaError_t GroupedGemm<Config, Kind>::run(const Problem& p, void* workspace, int sm_count,
                                           cudaStream_t stream) {
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(workspace) + 255) / 256 * 256);
  const DeviceArgs d = carve(base, p.num_experts);
  const int setup_blocks = (p.num_experts + 127) / 128;
  if constexpr (Kind::kWgrad) {
    setup_wgrad_args<GroupedGemm><<<setup_blocks, 128, 0, stream>>>(p, d);
    zero_empty_experts<ElementD><<<dim3(16, p.num_experts), 256, 0, stream>>>(p);
  } else {
    setup_grouped_args<GroupedGemm><<<setup_blocks, 128, 0, stream>>>(p, d);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return err;
  }
  Gemm gemm;
  const auto args = arguments(p, d, sm_count);
  void* cutlass_workspace = base + args_bytes(p.num_experts);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess ||
      gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    return cudaErrorInvalidValue;
  }
  return gemm.run(stream) == cutlass::Status::kSuccess ? cudaGetLastError() : cudaErrorLaunchFailure;
}

}  // namespace gemm
}  // namespace moe_kernels

// The two entry points of one configuration, declared in moe_kernels/grouped_gemm.h; each
// csrc/gemm/<name>.cu holds one: MOE_DEFINE_GEMM_CONFIG(name, Problem, GroupedGemm<Config, Kind>).
#define MOE_DEFINE_GEMM_CONFIG(name, Problem, ...)                                               \
  namespace moe_kernels::gemm {                                                                  \
  size_t name##_workspace_bytes(const Problem& p, int sm_count) {                                \
    return __VA_ARGS__::workspace_bytes(p, sm_count);                                            \
  }                                                                                              \
  cudaError_t name##_run(const Problem& p, void* workspace, int sm_count, cudaStream_t stream) { \
    return __VA_ARGS__::run(p, workspace, sm_count, stream);                                     \
  }                                                                                              \
  }
