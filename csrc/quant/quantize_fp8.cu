// Launchers of the FP8 quantisation kernels: argument checks, device guard, current stream.
#include "moe_kernels/quantize_fp8.cuh"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x_in, bool pow2_scale) {
  constexpr const char* op = "quantize_fp8";
  MK_CHECK_CUDA_TENSOR(x_in, op, "x");
  MK_CHECK_DIM(x_in, 2, op, "x", "[rows, channels]");
  MK_CHECK(x_in.size(1) % kQuantBlock == 0, op,
           "x's channels must be a multiple of 128 (one scale per 128), got ", x_in.size(1));
  check_hopper(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.size(0) > 0 ? aligned_rows(x_in) : x_in;
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor q = at::empty({rows, cols}, x.options().dtype(kFp8));
  at::Tensor scales = at::empty({rows, cols / kQuantBlock}, x.options().dtype(at::kFloat));
  if (rows == 0) {
    return {q, scales};
  }
  dispatch_float_type(x.scalar_type(), op, "x", [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    MK_CUDA_CHECK(
        launch_quantize_fp8_1x128<T>(static_cast<const T*>(x.data_ptr()), x.stride(0),
                                     static_cast<__nv_fp8_storage_t*>(q.data_ptr()), scales.data_ptr<float>(),
                                     rows, cols, pow2_scale, at::cuda::getCurrentCUDAStream()),
        op);
  });
  return {q, scales};
}

// (q, scales, q_t): q_t the transposed e4m3 copy [.., K, N] when `transposed` (else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_weight(const at::Tensor& w_in, bool pow2_scale,
                                                               bool transposed, const char* op) {
  MK_CHECK_CUDA_TENSOR(w_in, op, "w");
  MK_CHECK(w_in.dim() == 2 || w_in.dim() == 3, op, "w must be [N, K] or [experts, N, K], got shape ",
           shape_str(w_in));
  MK_CHECK(w_in.size(-1) % kQuantBlock == 0, op, "w's last dim K must be a multiple of 128, got ",
           w_in.size(-1));
  check_hopper(w_in, op);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const int64_t batch = w.dim() == 3 ? w.size(0) : 1, n = w.size(-2), k = w.size(-1);
  const int64_t row_blocks = (n + kQuantBlock - 1) / kQuantBlock;
  MK_CHECK(!transposed || n % kQuantBlock == 0, op,
           "w's N must be a multiple of 128 for the transposed copy, got ", n);
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(kFp8));
  std::vector<int64_t> t_sizes = w.sizes().vec();
  std::swap(t_sizes[t_sizes.size() - 1], t_sizes[t_sizes.size() - 2]);
  at::Tensor q_t = transposed ? at::empty(t_sizes, q.options()) : at::empty({0}, q.options());
  at::Tensor scales = w.dim() == 3
                          ? at::empty({batch, row_blocks, k / kQuantBlock}, w.options().dtype(at::kFloat))
                          : at::empty({row_blocks, k / kQuantBlock}, w.options().dtype(at::kFloat));
  if (q.numel() == 0) {
    return {q, scales, q_t};
  }
  dispatch_float_type(w.scalar_type(), op, "w", [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    MK_CUDA_CHECK(launch_quantize_fp8_128x128<T>(
                      static_cast<const T*>(w.data_ptr()), static_cast<__nv_fp8_storage_t*>(q.data_ptr()),
                      scales.data_ptr<float>(), batch, n, k, pow2_scale, at::cuda::getCurrentCUDAStream(),
                      transposed ? static_cast<__nv_fp8_storage_t*>(q_t.data_ptr()) : nullptr),
                  op);
  });
  return {q, scales, q_t};
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_weight(const at::Tensor& w, bool pow2_scale) {
  auto [q, scales, q_t] = quantize_weight(w, pow2_scale, /*transposed=*/false, "quantize_fp8_weight");
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp8_weight_transposed(const at::Tensor& w,
                                                                              bool pow2_scale) {
  return quantize_weight(w, pow2_scale, /*transposed=*/true, "quantize_fp8_weight_transposed");
}

at::Tensor dequantize_fp8(const at::Tensor& q_in, const at::Tensor& scales_in, at::ScalarType out_dtype) {
  constexpr const char* op = "dequantize_fp8";
  MK_CHECK_CUDA_TENSOR(q_in, op, "q");
  MK_CHECK_DTYPE(q_in, kFp8, op, "q");
  MK_CHECK_DTYPE(scales_in, at::kFloat, op, "scales");
  MK_CHECK_SAME_DEVICE(q_in, scales_in, op, "q", "scales");
  MK_CHECK(q_in.dim() == 2 || q_in.dim() == 3, op, "q must be [rows, K] or [experts, N, K], got shape ",
           shape_str(q_in));
  MK_CHECK(scales_in.dim() == q_in.dim(), op, "scales must have as many dims as q, got ",
           shape_str(scales_in), " for q ", shape_str(q_in));
  const int64_t batch = q_in.dim() == 3 ? q_in.size(0) : 1, n = q_in.size(-2), k = q_in.size(-1);
  MK_CHECK(k % kQuantBlock == 0, op, "q's last dim must be a multiple of 128, got ", k);
  // 1x128 scales have one row per row of q, 128x128 scales one per 128 rows.
  const int row_block = scales_in.size(-2) == n ? 1 : kQuantBlock;
  const int64_t row_blocks = (n + row_block - 1) / row_block;
  const bool scales_match = scales_in.size(-2) == row_blocks && scales_in.size(-1) == k / kQuantBlock &&
                            (q_in.dim() == 2 || scales_in.size(0) == batch);
  MK_CHECK(scales_match, op, "scales ", shape_str(scales_in), " fit neither 1x128 nor 128x128 blocks of q ",
           shape_str(q_in));
  check_hopper(q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  if (out.numel() == 0) {
    return out;
  }
  dispatch_float_type(out_dtype, op, "out_dtype", [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    MK_CUDA_CHECK(launch_dequantize_fp8<T>(static_cast<const __nv_fp8_storage_t*>(q.data_ptr()),
                                           scales.data_ptr<float>(), static_cast<T*>(out.data_ptr()), batch,
                                           n, k, row_block, at::cuda::getCurrentCUDAStream()),
                  op);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("quantize_fp8", &quantize_fp8);
  m.impl("quantize_fp8_weight", &quantize_fp8_weight);
  m.impl("quantize_fp8_weight_transposed", &quantize_fp8_weight_transposed);
  m.impl("dequantize_fp8", &dequantize_fp8);
}

}  // namespace moe_kernels
