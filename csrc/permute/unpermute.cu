// Launchers of unpermute (weighted combine) and its backward: argument checks (the messages of
// moe_kernels/_checks.py), device guard, current stream.
#include "common/device_error.h"
#include "moe_kernels/unpermute.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat;
}

void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                       const char* op) {
  MK_CHECK(a.device() == b.device(), op, name_a, " and ", name_b, " must be on the same device, got ",
           a.device(), " and ", b.device());
}

// Checks shared by the forward and the backward: rows (y or grad_out) [?, hidden], row_map, weights.
void check_rows_and_map(const at::Tensor& rows, const char* rows_name, const at::Tensor& row_map,
                        const std::optional<at::Tensor>& weights, const char* op) {
  MK_CHECK(rows.is_cuda(), op, rows_name, " must be a CUDA tensor, got device ", rows.device());
  MK_CHECK(rows.dim() == 2, op, rows_name, " must be 2-D [rows, hidden], got shape ", shape_str(rows));
  MK_CHECK(is_float_dtype(rows.scalar_type()), op, rows_name, " must be bfloat16 or float16 or float32, got ",
           dtype_name(rows.scalar_type()));
  MK_CHECK(rows.size(1) * rows.element_size() % 16 == 0, op, rows_name,
           "'s rows must be a multiple of 16 bytes (hidden a multiple of ", 16 / rows.element_size(), " for ",
           dtype_name(rows.scalar_type()), "), got hidden=", rows.size(1));
  MK_CHECK_DIM(row_map, 2, op, "row_map", "[tokens, top_k]");
  check_same_device(rows, rows_name, row_map, "row_map", op);
  MK_CHECK(row_map.scalar_type() == at::kInt, op, "row_map must be int32, got ",
           dtype_name(row_map.scalar_type()));
  const int64_t top_k = row_map.size(1);
  MK_CHECK(top_k >= 1 && top_k <= kUnpermuteMaxTopK, op, "top_k (row_map.shape[1]) must be in [1, ",
           kUnpermuteMaxTopK, "], got ", top_k);
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    check_same_device(rows, rows_name, w, "weights", op);
    MK_CHECK(w.sizes() == row_map.sizes(), op, "weights must be [tokens, top_k] = ", shape_str(row_map),
             " like row_map, got ", shape_str(w));
    MK_CHECK(is_float_dtype(w.scalar_type()), op, "weights must be bfloat16 or float16 or float32, got ",
             dtype_name(w.scalar_type()));
  }
}

// Calls f with null pointers of the element types of the rows and of the weights (float when none).
template <typename F>
void dispatch_rows_and_weights(at::ScalarType rows, const std::optional<at::Tensor>& weights, const char* op,
                               F&& f) {
  dispatch_float_type(rows, op, "y", [&](auto* row_tag) {
    if (!weights.has_value()) {
      f(row_tag, static_cast<float*>(nullptr));
      return;
    }
    dispatch_float_type(weights->scalar_type(), op, "weights",
                        [&](auto* weight_tag) { f(row_tag, weight_tag); });
  });
}

template <typename T, typename W>
UnpermuteParams<T, W> unpermute_params(const at::Tensor& y, int64_t y_rows, const at::Tensor& row_map,
                                       const std::optional<at::Tensor>& weights, int64_t hidden) {
  UnpermuteParams<T, W> p{};
  p.y = y.defined() ? static_cast<const T*>(y.data_ptr()) : nullptr;
  p.y_row_stride = y.defined() ? y.stride(0) : 0;
  p.y_rows = y_rows;
  p.row_map = row_map.data_ptr<int>();
  p.weights = weights.has_value() ? static_cast<const W*>(weights->data_ptr()) : nullptr;
  p.row_vecs = hidden * static_cast<int64_t>(sizeof(T)) / 16;
  p.top_k = static_cast<int>(row_map.size(1));
  p.error_flag = device_error_flag();
  return p;
}

at::Tensor unpermute(const at::Tensor& y_in, const at::Tensor& row_map_in,
                     const std::optional<at::Tensor>& weights_in,
                     const std::optional<at::Tensor>& shared_in) {
  constexpr const char* op = "unpermute";
  check_rows_and_map(y_in, "y", row_map_in, weights_in, op);
  const int64_t tokens = row_map_in.size(0), hidden = y_in.size(1);
  if (shared_in.has_value()) {
    const at::Tensor& s = *shared_in;
    MK_CHECK_SAME_DEVICE(y_in, s, op, "y", "shared_output");
    MK_CHECK(s.dim() == 2 && s.size(0) == tokens && s.size(1) == hidden, op,
             "shared_output must be [tokens, hidden] = [", tokens, ", ", hidden, "], got ", shape_str(s));
    MK_CHECK(s.scalar_type() == y_in.scalar_type(), op, "shared_output must be ",
             dtype_name(y_in.scalar_type()), " like y, got ", dtype_name(s.scalar_type()));
  }
  check_hopper(y_in, op);
  const c10::cuda::CUDAGuard guard(y_in.device());
  at::Tensor out = at::empty({tokens, hidden}, y_in.options());
  if (tokens == 0 || hidden == 0) {
    return out;
  }
  const at::Tensor y = y_in.size(0) > 0 ? aligned_rows(y_in) : y_in;
  const at::Tensor row_map = row_map_in.contiguous();
  const std::optional<at::Tensor> weights =
      weights_in.has_value() ? std::optional<at::Tensor>(weights_in->contiguous()) : std::nullopt;
  const at::Tensor shared = shared_in.has_value() ? aligned_rows(*shared_in) : at::Tensor();
  dispatch_rows_and_weights(y.scalar_type(), weights, op, [&](auto* row_tag, auto* weight_tag) {
    using T = std::remove_pointer_t<decltype(row_tag)>;
    using W = std::remove_pointer_t<decltype(weight_tag)>;
    UnpermuteParams<T, W> p = unpermute_params<T, W>(y, y.size(0), row_map, weights, hidden);
    p.shared = shared.defined() ? static_cast<const T*>(shared.data_ptr()) : nullptr;
    p.shared_row_stride = shared.defined() ? shared.stride(0) : 0;
    p.out = static_cast<T*>(out.data_ptr());
    const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    MK_CUDA_CHECK(launch_unpermute(p, tokens, sm_count, at::cuda::getCurrentCUDAStream()), op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_out_in,
                                                      const at::Tensor& row_map_in,
                                                      const std::optional<at::Tensor>& weights_in,
                                                      const std::optional<at::Tensor>& y_in,
                                                      int64_t num_rows) {
  constexpr const char* op = "unpermute_backward";
  check_rows_and_map(grad_out_in, "grad_out", row_map_in, weights_in, op);
  const int64_t tokens = row_map_in.size(0), hidden = grad_out_in.size(1);
  MK_CHECK(grad_out_in.size(0) == tokens, op, "grad_out has ", grad_out_in.size(0), " rows, row_map has ",
           tokens);
  MK_CHECK(num_rows >= 0, op, "num_rows must be >= 0, got ", num_rows);
  if (y_in.has_value()) {
    const at::Tensor& y = *y_in;
    MK_CHECK_SAME_DEVICE(grad_out_in, y, op, "grad_out", "y");
    MK_CHECK(y.dim() == 2 && y.size(0) == num_rows && y.size(1) == hidden, op,
             "y must be [num_rows, hidden] = [", num_rows, ", ", hidden, "], got ", shape_str(y));
    MK_CHECK(y.scalar_type() == grad_out_in.scalar_type(), op, "y must be ",
             dtype_name(grad_out_in.scalar_type()), " like grad_out, got ", dtype_name(y.scalar_type()));
  }
  check_hopper(grad_out_in, op);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  // Rows no pair maps to (padding, unused tail) get zero gradient.
  at::Tensor grad_y = at::zeros({num_rows, hidden}, grad_out_in.options());
  at::Tensor grad_weights =
      y_in.has_value() ? at::zeros({tokens, row_map_in.size(1)}, grad_out_in.options().dtype(at::kFloat))
                       : at::empty({0}, grad_out_in.options().dtype(at::kFloat));
  if (tokens == 0 || hidden == 0) {
    return {grad_y, grad_weights};
  }
  const at::Tensor grad_out = aligned_rows(grad_out_in);
  const at::Tensor y = y_in.has_value() && num_rows > 0 ? aligned_rows(*y_in) : at::Tensor();
  const at::Tensor row_map = row_map_in.contiguous();
  const std::optional<at::Tensor> weights =
      weights_in.has_value() ? std::optional<at::Tensor>(weights_in->contiguous()) : std::nullopt;
  dispatch_rows_and_weights(grad_out.scalar_type(), weights, op, [&](auto* row_tag, auto* weight_tag) {
    using T = std::remove_pointer_t<decltype(row_tag)>;
    using W = std::remove_pointer_t<decltype(weight_tag)>;
    UnpermuteBackwardParams<T, W> p{};
    p.fwd = unpermute_params<T, W>(y, num_rows, row_map, weights, hidden);
    p.grad_out = static_cast<const T*>(grad_out.data_ptr());
    p.grad_out_row_stride = grad_out.stride(0);
    p.grad_y = static_cast<T*>(grad_y.data_ptr());
    p.grad_weights = y_in.has_value() ? grad_weights.data_ptr<float>() : nullptr;
    MK_CUDA_CHECK(launch_unpermute_backward(p, tokens, at::cuda::getCurrentCUDAStream()), op);
  });
  return {grad_y, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("unpermute", &unpermute);
  m.impl("unpermute_backward", &unpermute_backward);
}

}  // namespace moe_kernels
