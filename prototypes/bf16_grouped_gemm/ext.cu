// Minimal torch binding of every variant of our BF16 grouped GEMM kernel
// (moe_kernels/bf16_grouped_sm90.cuh; the library launches one of them as bf16_wgmma_128x256).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "moe_kernels/bf16_grouped_sm90.cuh"

namespace {

using namespace moe_kernels::bf16g;

constexpr int kNumConfigs = 8;
const char* config_name(int c) {
  switch (c) {
    case 0:
      return "BN256_S4";
    case 1:
      return "BN256_S3_D4";
    case 2:
      return "BN256x2_S4";
    case 3:
      return "BN192_S5";
    case 4:
      return "BN192_S4_D3";
    case 5:
      return "BN128_S6";
    case 6:
      return "BN256_S4_C2";
    case 7:
      return "BN192_S5_C2";
    default:
      return "?";
  }
}

// Bad offsets are clamped, not reported here (no error flag).
cudaError_t run_config(int config, const void* a, const void* b, const int32_t* offsets, void* out,
                       int64_t m_total, int n, int k, int num_experts, int device, int num_sms,
                       cudaStream_t stream) {
#define BF16G_CALL(C)                                                                           \
  bf16_grouped_run<C>(a, b, offsets, out, nullptr, m_total, n, k, num_experts, device, num_sms, \
                      /*pdl=*/true, stream)
  switch (config) {
    case 0:
      return BF16G_CALL(Cfg256_S4);
    case 1:
      return BF16G_CALL(Cfg256_S3);
    case 2:
      return BF16G_CALL(Cfg256x2_S4);
    case 3:
      return BF16G_CALL(Cfg192_S5);
    case 4:
      return BF16G_CALL(Cfg192_S4);
    case 5:
      return BF16G_CALL(Cfg128_S6);
    case 6:
      return BF16G_CALL(Cfg256_S4_C2);
    case 7:
      return BF16G_CALL(Cfg192_S5_C2);
    default:
      return cudaErrorInvalidValue;
  }
#undef BF16G_CALL
}

void check_tensor(const torch::Tensor& t, const char* name, int64_t dim, const torch::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || std::string(name) == "offsets", name, " must be bf16");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// out[rows of e] = a[rows of e] @ b[e]^T, written in place into out (rows outside the experts kept).
void run(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& offsets, torch::Tensor& out,
         int64_t config) {
  check_tensor(a, "a", 2, a);
  check_tensor(b, "b", 3, a);
  check_tensor(offsets, "offsets", 1, a);
  TORCH_CHECK(offsets.scalar_type() == at::kInt, "offsets must be int32");
  check_tensor(out, "out", 2, a);
  const int64_t m = a.size(0), k = a.size(1), e = b.size(0), n = b.size(1);
  TORCH_CHECK(n % 64 == 0 && k % 64 == 0 && n > 0 && k > 0, "N and K must be positive multiples of 64");
  TORCH_CHECK(b.size(2) == k, "b must be [E, N, K=", k, "], got ", b.sizes());
  TORCH_CHECK(e >= 1 && e <= kMaxExperts, "1 <= E <= 1024");
  TORCH_CHECK(offsets.size(0) == e + 1, "offsets must be [E+1]");
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "out must be [M, N]");
  TORCH_CHECK(config >= 0 && config < kNumConfigs, "config out of range");
  if (m == 0)
    return;
  const c10::cuda::CUDAGuard guard(a.device());
  static int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t err =
      run_config((int)config, a.data_ptr(), b.data_ptr(), offsets.data_ptr<int32_t>(), out.data_ptr(), m,
                 (int)n, (int)k, (int)e, a.get_device(), num_sms, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bf16_grouped_run failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "BF16 grouped GEMM prototype (in place into out)", py::arg("a"), py::arg("b"),
        py::arg("offsets"), py::arg("out"), py::arg("config"));
  m.attr("num_configs") = kNumConfigs;
  m.def("config_name", [](int c) { return std::string(config_name(c)); });
}
