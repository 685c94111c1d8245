// Launchers of the fused router forward and backward.
#include "router/dispatch.h"

namespace moe_kernels {
namespace router {
namespace {

// Blocks of a multi-token forward kernel that fit on one SM (asked once per kernel). Those kernels
// run as one wave of resident blocks whose warps loop over their tokens: for the pair kernel, 41.7 /
// 47.4 us at T = 65536 (DeepSeek-V3 / Kimi-K2) against 42.7 / 49.1 with two waves and 50.7 / 50.8
// with four.
template <auto kKernel>
int resident_blocks() {
  static const int blocks = [] {
    int n = 0;
    MK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kWarpsPerBlock * 32, 0),
                  "router");
    return std::max(n, 1);
  }();
  return blocks;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_forward(const at::Tensor& logits_in, int64_t top_k,
                                                              const std::optional<at::Tensor>& bias_in,
                                                              c10::string_view score_func_name,
                                                              int64_t num_groups, int64_t topk_groups,
                                                              c10::string_view group_score, bool renormalize,
                                                              double scaling_factor, bool return_counts) {
  constexpr const char* op = "router";
  check_logits(logits_in, op);
  const ScoreFunc score_func = parse_score_func(score_func_name, op);
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  MK_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(kMaxTopK, num_experts), op,
           "top_k must be in [1, min(16, experts=", num_experts, ")], got ", top_k);
  MK_CHECK(group_score == "top2_sum" || group_score == "max", op,
           "group_score must be 'top2_sum' or 'max', got '", group_score, "'");
  MK_CHECK(num_groups >= 1 && num_groups <= kMaxGroups && num_experts % num_groups == 0, op,
           "num_groups must be in [1, 32] and divide experts=", num_experts, ", got ", num_groups);
  MK_CHECK(topk_groups >= 1 && topk_groups <= num_groups, op,
           "topk_groups must be in [1, num_groups=", num_groups, "], got ", topk_groups);
  const int64_t group_size = num_experts / num_groups;
  if (num_groups > 1) {
    MK_CHECK(top_k <= topk_groups * group_size, op, "top_k=", top_k,
             " exceeds the experts in the kept groups (topk_groups * experts/num_groups = ",
             topk_groups * group_size, ")");
    MK_CHECK(group_score != "top2_sum" || group_size >= 2, op,
             "group_score='top2_sum' needs at least 2 experts per group, got ", group_size);
  }
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = *bias_in;
    MK_CHECK_DTYPE(bias, at::kFloat, op, "bias");
    MK_CHECK(bias.dim() == 1 && bias.size(0) == num_experts, op, "bias must be [experts=", num_experts,
             "], got shape ", shape_str(bias));
    MK_CHECK_SAME_DEVICE(bias, logits_in, op, "bias", "logits");
    bias = bias.contiguous();
  }
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const auto options = logits.options();
  at::Tensor weights = at::empty({num_tokens, top_k}, options.dtype(at::kFloat));
  at::Tensor ids = at::empty({num_tokens, top_k}, options.dtype(at::kInt));
  // The zero fill must be the last work queued before the forward kernel, which overlaps it
  // (flush_block_counts in router.cuh).
  at::Tensor counts = return_counts ? at::zeros({num_experts}, options.dtype(at::kInt))
                                    : at::empty({0}, options.dtype(at::kInt));
  if (num_tokens == 0) {
    return {weights, ids, counts};
  }

  const int vpt = values_per_lane(num_experts);
  const int lanes_per_group = group_size % vpt == 0 ? static_cast<int>(group_size / vpt) : 0;
  ForwardParams p{};
  p.logits = logits.data_ptr();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  p.counts = return_counts ? counts.data_ptr<int32_t>() : nullptr;
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.top_k = static_cast<int>(top_k);
  p.vpt = vpt;
  p.num_groups = static_cast<int>(num_groups);
  p.topk_groups = static_cast<int>(topk_groups);
  p.group_size = static_cast<int>(group_size);
  p.group_top2 = group_score == "top2_sum";
  // One group per lane and 2^n lanes per group: group scores by shuffles instead of shared memory.
  p.lane_local_groups =
      lanes_per_group > 0 && lanes_per_group <= 32 && (lanes_per_group & (lanes_per_group - 1)) == 0;
  p.group_lanes_log2 = p.lane_local_groups ? __builtin_ctz(lanes_per_group) : 0;
  p.renormalize = renormalize;
  p.vectorized = rows_vectorizable(logits, vpt);
  p.scaling_factor = static_cast<float>(scaling_factor);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Four tokens per warp for DeepSeek-V3's shape (E = 256, K <= 8) from 1024 tokens, else two where
  // it applies (Kimi-K2, and DeepSeek-V3 below): the same results, a half and a quarter of the
  // per-token cost of the warp collectives.
  if (quad_kernel_applies(num_tokens, num_experts, num_groups, top_k, score_func)) {
    p.vpt = kQuadVpt;
    p.vectorized = rows_vectorizable(logits, kQuadVpt);
    dispatch_float_type(logits.scalar_type(), op, "logits", [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      constexpr auto kernel = router_forward_quad_kernel<T, kQuadVpt>;
      const int quad_grid =
          warp_per_token_grid((num_tokens + 3) / 4, kWarpsPerBlock, resident_blocks<kernel>());
      MK_CUDA_CHECK(launch_pdl(kernel, quad_grid, kWarpsPerBlock * 32, 0, stream, return_counts, p), op);
    });
    return {weights, ids, counts};
  }
  const int pair_vpt = pair_values_per_lane(num_experts, num_groups, score_func);
  if (pair_vpt > 0) {
    p.vpt = pair_vpt;
    p.vectorized = rows_vectorizable(logits, pair_vpt);
    dispatch_router_pair_kernel(logits.scalar_type(), pair_vpt, op, [&]<typename T, int kVpt>() {
      const int pair_grid = warp_per_token_grid((num_tokens + 1) / 2, kWarpsPerBlock,
                                                resident_blocks<router_forward_pair_kernel<T, kVpt>>());
      MK_CUDA_CHECK(launch_pdl(router_forward_pair_kernel<T, kVpt>, pair_grid, kWarpsPerBlock * 32, 0, stream,
                               return_counts, p),
                    op);
    });
    return {weights, ids, counts};
  }

  const size_t group_smem =
      (num_groups > 1 && !p.lane_local_groups) ? kWarpsPerBlock * num_experts * sizeof(float) : 0;
  const int grid = warp_per_token_grid(num_tokens, kWarpsPerBlock, 8);
  dispatch_router_kernel(
      logits.scalar_type(), vpt, score_func, op, [&]<typename T, int kMaxVpt, bool kSigmoid>() {
        MK_CUDA_CHECK(launch_pdl(router_forward_kernel<T, kMaxVpt, kSigmoid>, grid, kWarpsPerBlock * 32,
                                 group_smem, stream, return_counts, p),
                      op);
      });
  return {weights, ids, counts};
}

at::Tensor router_backward(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                           const at::Tensor& ids_in, c10::string_view score_func_name, bool renormalize,
                           double scaling_factor) {
  constexpr const char* op = "router_backward";
  check_logits(logits_in, op);
  const ScoreFunc score_func = parse_score_func(score_func_name, op);
  const int64_t num_tokens = logits_in.size(0), num_experts = logits_in.size(1);
  MK_CHECK_DTYPE(grad_weights_in, at::kFloat, op, "grad_weights");
  MK_CHECK_DTYPE(ids_in, at::kInt, op, "ids");
  MK_CHECK(grad_weights_in.dim() == 2 && grad_weights_in.size(0) == num_tokens &&
               grad_weights_in.sizes() == ids_in.sizes(),
           op, "grad_weights and ids must both be [tokens=", num_tokens, ", top_k], got ",
           shape_str(grad_weights_in), " and ", shape_str(ids_in));
  const int64_t top_k = ids_in.size(1);
  MK_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(kMaxTopK, num_experts), op,
           "top_k must be in [1, min(16, experts=", num_experts, ")], got ", top_k);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), grad_weights = grad_weights_in.contiguous(),
                   ids = ids_in.contiguous();
  at::Tensor grad_logits = at::empty_like(logits);
  if (num_tokens == 0) {
    return grad_logits;
  }
  const int vpt = values_per_lane(num_experts);
  BackwardParams p{};
  p.grad_weights = grad_weights.data_ptr<float>();
  p.logits = logits.data_ptr();
  p.ids = ids.data_ptr<int32_t>();
  p.grad_logits = grad_logits.data_ptr();
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.top_k = static_cast<int>(top_k);
  p.vpt = vpt;
  p.renormalize = renormalize;
  p.vectorized = rows_vectorizable(logits, vpt);
  p.scaling_factor = static_cast<float>(scaling_factor);
  const int grid = warp_per_token_grid(num_tokens, kWarpsPerBlock, 8);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_router_kernel(
      logits.scalar_type(), vpt, score_func, op, [&]<typename T, int kMaxVpt, bool kSigmoid>() {
        router_backward_kernel<T, kMaxVpt, kSigmoid><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
        MK_CUDA_CHECK(cudaGetLastError(), op);
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("router", &router_forward);
  m.impl("router_backward", &router_backward);
}

}  // namespace router
}  // namespace moe_kernels
