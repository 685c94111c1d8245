// Launchers of the balance-loss kernels and of the expert-bias update.
#include "common/device_error.h"
#include "moe_kernels/balance.cuh"
#include "router/dispatch.h"

namespace moe_kernels {
namespace balance {
namespace {

using router::dispatch_router_kernel;
using router::ScoreFunc;

struct LossSetup {
  Params params{};
  at::Tensor logits, ids, seq_offsets;
  ScoreFunc score_func;
};

LossSetup setup(const char* op, const at::Tensor& logits_in, const at::Tensor& ids_in,
                const std::optional<at::Tensor>& seq_offsets_in, c10::string_view score_func,
                int64_t num_devices) {
  router::check_logits(logits_in, op);
  LossSetup s;
  s.score_func = router::parse_score_func(score_func, op);
  s.logits = logits_in.contiguous();
  const int64_t num_tokens = s.logits.size(0), num_experts = s.logits.size(1);
  MK_CHECK(ids_in.dim() == 2 && ids_in.size(0) == num_tokens && ids_in.size(1) >= 1, op,
           "expert_ids must be [tokens=", num_tokens, ", top_k], got shape ", shape_str(ids_in));
  MK_CHECK(ids_in.scalar_type() == at::kInt || ids_in.scalar_type() == at::kLong, op,
           "expert_ids must be int32 or int64, got ", ids_in.scalar_type());
  MK_CHECK_SAME_DEVICE(ids_in, logits_in, op, "expert_ids", "logits");
  s.ids = ids_in.to(at::kInt).contiguous();
  MK_CHECK(num_devices >= 0 && (num_devices == 0 || num_experts % num_devices == 0), op,
           "num_devices must be 0 (expert-level) or divide experts=", num_experts, ", got ", num_devices);
  int64_t num_seqs = 1;
  if (seq_offsets_in.has_value()) {
    const at::Tensor& offsets = *seq_offsets_in;
    MK_CHECK_DTYPE(offsets, at::kInt, op, "seq_offsets");
    MK_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2, op,
             "seq_offsets must be [sequences + 1], got shape ", shape_str(offsets));
    MK_CHECK_SAME_DEVICE(offsets, logits_in, op, "seq_offsets", "logits");
    s.seq_offsets = offsets.contiguous();
    num_seqs = offsets.size(0) - 1;
  }
  Params& p = s.params;
  p.logits = s.logits.data_ptr();
  p.ids = s.ids.data_ptr<int32_t>();
  p.seq_offsets = s.seq_offsets.defined() ? s.seq_offsets.data_ptr<int32_t>() : nullptr;
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.top_k = static_cast<int>(s.ids.size(1));
  p.vpt = router::values_per_lane(num_experts);
  p.num_seqs = static_cast<int>(num_seqs);
  p.experts_per_device = num_devices == 0 ? 1 : static_cast<int>(num_experts / num_devices);
  p.vectorized = router::rows_vectorizable(s.logits, p.vpt);
  p.error_flag = device_error_flag();
  return s;
}

std::tuple<at::Tensor, at::Tensor> balance_loss(const at::Tensor& logits, const at::Tensor& expert_ids,
                                                const std::optional<at::Tensor>& seq_offsets,
                                                c10::string_view score_func, int64_t num_devices,
                                                double alpha) {
  constexpr const char* op = "balance_loss";
  const c10::cuda::CUDAGuard guard(logits.device());
  LossSetup s = setup(op, logits, expert_ids, seq_offsets, score_func, num_devices);
  Params& p = s.params;
  const auto options = s.logits.options();
  const int64_t cells = int64_t(p.num_seqs) * p.num_experts;
  at::Tensor counts = at::zeros({cells}, options.dtype(at::kInt));
  at::Tensor psum = at::zeros({cells}, options.dtype(at::kLong));
  at::Tensor coeffs = at::empty({p.num_seqs, p.num_experts}, options.dtype(at::kFloat));
  at::Tensor loss = at::empty({}, options.dtype(at::kFloat));
  p.alpha = static_cast<float>(alpha);
  p.counts = counts.data_ptr<int32_t>();
  p.psum = reinterpret_cast<unsigned long long*>(psum.data_ptr<int64_t>());
  p.coeffs = coeffs.data_ptr<float>();
  p.loss = loss.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (p.num_tokens > 0) {
    const int grid = router::warp_per_token_grid(p.num_tokens, kWarpsPerBlock, 4);
    dispatch_router_kernel(
        s.logits.scalar_type(), p.vpt, s.score_func, op, [&]<typename T, int kMaxVpt, bool kSigmoid>() {
          balance_stats_kernel<T, kMaxVpt, kSigmoid><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
          MK_CUDA_CHECK(cudaGetLastError(), op);
        });
  }
  balance_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(p);
  MK_CUDA_CHECK(cudaGetLastError(), op);
  return {loss, coeffs};
}

at::Tensor balance_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& expert_ids, const at::Tensor& coeffs,
                                 const std::optional<at::Tensor>& seq_offsets, c10::string_view score_func) {
  constexpr const char* op = "balance_loss_backward";
  const c10::cuda::CUDAGuard guard(logits.device());
  LossSetup s = setup(op, logits, expert_ids, seq_offsets, score_func, 0);
  Params& p = s.params;
  MK_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat, op,
           "grad_loss must be one float32 value, got shape ", shape_str(grad_loss));
  MK_CHECK(coeffs.dim() == 2 && coeffs.size(0) == p.num_seqs && coeffs.size(1) == p.num_experts &&
               coeffs.scalar_type() == at::kFloat,
           op, "coeffs must be float32 [sequences=", p.num_seqs, ", experts=", p.num_experts, "], got ",
           shape_str(coeffs));
  const at::Tensor grad = grad_loss.contiguous(), coeff = coeffs.contiguous();
  at::Tensor grad_logits = at::empty_like(s.logits);
  if (p.num_tokens == 0) {
    return grad_logits;
  }
  p.grad_loss = grad.data_ptr<float>();
  p.coeffs = const_cast<float*>(coeff.data_ptr<float>());
  p.grad_logits = grad_logits.data_ptr();
  const int grid = router::warp_per_token_grid(p.num_tokens, kWarpsPerBlock, 8);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_router_kernel(
      s.logits.scalar_type(), p.vpt, s.score_func, op, [&]<typename T, int kMaxVpt, bool kSigmoid>() {
        balance_backward_kernel<T, kMaxVpt, kSigmoid><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
        MK_CUDA_CHECK(cudaGetLastError(), op);
      });
  return grad_logits;
}

void update_expert_bias(at::Tensor& bias, const at::Tensor& counts, double rate) {
  constexpr const char* op = "update_expert_bias";
  MK_CHECK_CUDA_TENSOR(bias, op, "bias");
  MK_CHECK_DTYPE(bias, at::kFloat, op, "bias");
  MK_CHECK(bias.dim() == 1 && bias.is_contiguous(), op,
           "bias must be a contiguous [experts] tensor, got shape ", shape_str(bias));
  MK_CHECK(counts.dim() == 1 && counts.size(0) == bias.size(0), op, "counts must be [experts=", bias.size(0),
           "], got shape ", shape_str(counts));
  MK_CHECK(counts.scalar_type() == at::kInt || counts.scalar_type() == at::kLong, op,
           "counts must be int32 or int64 (exact counts), got ", counts.scalar_type());
  MK_CHECK_SAME_DEVICE(bias, counts, op, "bias", "counts");
  check_hopper(bias, op);
  if (bias.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(bias.device());
  const at::Tensor c = counts.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int n = static_cast<int>(bias.size(0));
  if (c.scalar_type() == at::kInt) {
    update_expert_bias_kernel<int32_t>
        <<<1, 1024, 0, stream>>>(bias.data_ptr<float>(), c.data_ptr<int32_t>(), n, static_cast<float>(rate));
  } else {
    update_expert_bias_kernel<int64_t>
        <<<1, 1024, 0, stream>>>(bias.data_ptr<float>(), c.data_ptr<int64_t>(), n, static_cast<float>(rate));
  }
  MK_CUDA_CHECK(cudaGetLastError(), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("balance_loss", &balance_loss);
  m.impl("balance_loss_backward", &balance_loss_backward);
  m.impl("update_expert_bias", &update_expert_bias);
}

}  // namespace balance
}  // namespace moe_kernels
