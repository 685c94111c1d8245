// Picks the instantiation of a router-family kernel: logits dtype x values per lane x score function.
#pragma once

#include <type_traits>

#include "moe_kernels/router.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace router {

enum class ScoreFunc { kSoftmax, kSigmoid };

inline ScoreFunc parse_score_func(c10::string_view name, const char* op) {
  if (name == "softmax") {
    return ScoreFunc::kSoftmax;
  }
  MK_CHECK(name == "sigmoid", op, "score_func must be 'softmax' or 'sigmoid', got '", name, "'");
  return ScoreFunc::kSigmoid;
}

// Experts per lane, ceil(E / 32), and whether a lane's experts can be read in 16-byte pieces.
inline int values_per_lane(int64_t num_experts) {
  return static_cast<int>((num_experts + 31) / 32);
}

inline bool rows_vectorizable(const at::Tensor& logits, int vpt) {
  const int64_t bytes = vpt * logits.element_size();
  return bytes % 16 == 0 && logits.size(1) % vpt == 0 &&
         reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
}

// Calls f.template operator()<T, kMaxVpt, kSigmoid>() with kMaxVpt the power of two >= vpt.
template <typename T, bool kSigmoid, typename F>
void dispatch_vpt(int vpt, F&& f) {
  if (vpt <= 2) {
    f.template operator()<T, 2, kSigmoid>();
  } else if (vpt <= 4) {
    f.template operator()<T, 4, kSigmoid>();
  } else if (vpt <= 8) {
    f.template operator()<T, 8, kSigmoid>();
  } else if (vpt <= 16) {
    f.template operator()<T, 16, kSigmoid>();
  } else {
    f.template operator()<T, 32, kSigmoid>();
  }
}

template <typename F>
void dispatch_router_kernel(at::ScalarType dtype, int vpt, ScoreFunc score_func, const char* op, F&& f) {
  dispatch_float_type(dtype, op, "logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (score_func == ScoreFunc::kSigmoid) {
      dispatch_vpt<T, true>(vpt, f);
    } else {
      dispatch_vpt<T, false>(vpt, f);
    }
  });
}

// Experts per lane of router_forward_pair_kernel (two tokens per warp), or 0 where it does not
// apply: sigmoid scores, E = 16 * vpt for an instantiated vpt, groups (if any) of whole lanes.
inline int pair_values_per_lane(int64_t num_experts, int64_t num_groups, ScoreFunc score_func) {
  if (score_func != ScoreFunc::kSigmoid || num_experts % kHalfWarp != 0 || kHalfWarp % num_groups != 0) {
    return 0;
  }
  const int vpt = static_cast<int>(num_experts / kHalfWarp);
  return (vpt == 2 || vpt == 4 || vpt == 8 || vpt == 16 || vpt == 24) ? vpt : 0;
}

// Calls f.template operator()<T, kVpt>() for a vpt accepted by pair_values_per_lane.
template <typename F>
void dispatch_router_pair_kernel(at::ScalarType dtype, int vpt, const char* op, F&& f) {
  dispatch_float_type(dtype, op, "logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    switch (vpt) {
      case 2: {
        f.template operator()<T, 2>();
        break;
      }
      case 4: {
        f.template operator()<T, 4>();
        break;
      }
      case 8: {
        f.template operator()<T, 8>();
        break;
      }
      case 16: {
        f.template operator()<T, 16>();
        break;
      }
      case 24: {
        f.template operator()<T, 24>();
        break;
      }
      default: {
        MK_CHECK(false, op, "no two-tokens-per-warp kernel for ", vpt, " experts per lane");
      }
    }
  });
}

// Tokens from which the quad kernel runs: it routes more tokens per instruction, but each lane's
// chain of 32 experts is twice the pair kernel's 16, so a call of few tokens (one pass of the warps:
// latency, not issue rate) takes longer. H200, DeepSeek-V3, replayed: T = 1 / 128 4.6 / 5.6 us
// (pair 4.0 / 4.7), T = 4096 7.1 us (pair 7.9), T = 65536 33.3 us (pair 37.4).
constexpr int64_t kQuadMinTokens = 1024;

// Whether router_forward_quad_kernel (four tokens per warp) applies: sigmoid scores, E = 8 lanes of
// kQuadVpt experts (256), top_k <= 8 (a quarter's picks sit on its 8 lanes), groups (if any) of
// whole lanes, and at least kQuadMinTokens tokens.
inline bool quad_kernel_applies(int64_t num_tokens, int64_t num_experts, int64_t num_groups, int64_t top_k,
                                ScoreFunc score_func) {
  return num_tokens >= kQuadMinTokens && score_func == ScoreFunc::kSigmoid &&
         num_experts == kQuarterWarp * kQuadVpt && top_k <= kQuarterWarp && kQuarterWarp % num_groups == 0;
}

// Grid of a warp-per-token kernel: enough 8-warp blocks for every token, at most `waves` per SM.
inline int warp_per_token_grid(int64_t num_tokens, int warps_per_block, int waves) {
  const int64_t needed = (num_tokens + warps_per_block - 1) / warps_per_block;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * waves;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  MK_CHECK_CUDA_TENSOR(logits, op, "logits");
  MK_CHECK_DIM(logits, 2, op, "logits", "[tokens, experts]");
  MK_CHECK(logits.size(1) >= 2 && logits.size(1) <= kMaxExperts, op,
           "the number of experts (logits.shape[1]) must be in [2, 1024], got ", logits.size(1));
  check_hopper(logits, op);
}

}  // namespace router
}  // namespace moe_kernels
