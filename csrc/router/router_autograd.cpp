// The router's autograd, in C++: weights are differentiable w.r.t. logits (not bias); ids and
// counts are not differentiable. A Python autograd registration cost about 40 µs of host time per
// backward (and some per forward), as much as the backward kernel itself at 65k tokens; this runs
// the same two ops with only the C++ autograd engine around them.
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace moe_kernels {
namespace router {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using RouterSchema = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                    const std::optional<at::Tensor>&,
                                                                    c10::string_view, int64_t, int64_t,
                                                                    c10::string_view, bool, double, bool);
using RouterBackwardSchema = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        c10::string_view, bool, double);

class RouterFunction : public torch::autograd::Function<RouterFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t top_k,
                               const std::optional<at::Tensor>& bias, c10::string_view score_func,
                               int64_t num_groups, int64_t topk_groups, c10::string_view group_score,
                               bool renormalize, double scaling_factor, bool return_counts) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("moe_kernels::router", "").typed<RouterSchema>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [weights, ids, counts] = op.call(logits, top_k, bias, score_func, num_groups, topk_groups,
                                          group_score, renormalize, scaling_factor, return_counts);
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["score_func"] = std::string(score_func);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scaling_factor"] = scaling_factor;
    ctx->mark_non_differentiable({ids, counts});
    ctx->set_materialize_grads(false);  // no zero gradients made for ids and counts
    return {weights, ids, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("moe_kernels::router_backward", "")
                               .typed<RouterBackwardSchema>();
    variable_list out(10);  // one per forward argument; only logits gets a gradient
    const at::Tensor& grad_weights = grads[0];
    if (!grad_weights.defined() || !ctx->needs_input_grad(0)) {
      return out;
    }
    const variable_list saved = ctx->get_saved_variables();
    const std::string score_func = ctx->saved_data["score_func"].toStringRef();
    out[0] = op.call(grad_weights.to(at::kFloat), saved[0], saved[1], score_func,
                     ctx->saved_data["renormalize"].toBool(), ctx->saved_data["scaling_factor"].toDouble());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_autograd(const at::Tensor& logits, int64_t top_k,
                                                               const std::optional<at::Tensor>& bias,
                                                               c10::string_view score_func,
                                                               int64_t num_groups, int64_t topk_groups,
                                                               c10::string_view group_score, bool renormalize,
                                                               double scaling_factor, bool return_counts) {
  const variable_list out = RouterFunction::apply(logits, top_k, bias, score_func, num_groups, topk_groups,
                                                  group_score, renormalize, scaling_factor, return_counts);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, Autograd, m) {
  m.impl("router", &router_autograd);
}

}  // namespace router
}  // namespace moe_kernels
