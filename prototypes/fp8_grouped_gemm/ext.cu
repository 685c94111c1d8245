// Minimal torch binding of every variant of our FP8 grouped GEMM (csrc/include/moe_kernels/
// fp8_grouped_sm90.cuh; the library launches two of them as its fp8_wgmma_* configurations).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "moe_kernels/fp8_grouped_sm90.cuh"

namespace {

using namespace moe_kernels::fp8g;

// Only the variants still in play are compiled (each instantiation adds about 20 s to the device
// build). The others measured before (V2 BN 128 / 256, V3, *_NS) stay in the header; git history
// (before 2026-12-07's twelfth session) has their cases here.
constexpr int kNumConfigs = 6;
const char* config_name(int c) {
  switch (c) {
    case 0: return "V2_BN192_S4";
    case 1: return "V2_BN192_S4_KC";
    case 2: return "V2_BN192_S4_TS";
    case 3: return "V2_BN192_S4_KC_TS";
    case 4: return "V4_BN192_S4_M2";
    case 5: return "V4_BN192_S4_M2_KC";
    default: return "?";
  }
}

// Bad offsets are clamped, not reported here (no error flag): the library's tests cover the report.
// a_scales_ld: 0 for K-major a scales, else the row stride of MN-major ones (the *_TS configs).
cudaError_t run_config(int config, const void* a, const float* a_scales, const void* b, const float* b_scales,
                       const int32_t* offsets, void* out, int64_t m_total, int n, int k, int num_experts,
                       int device, int num_sms, cudaStream_t stream, int64_t a_scales_ld) {
#define FP8G_CALL(C) \
  fp8_grouped_run<C>(a, a_scales, b, b_scales, offsets, out, nullptr, m_total, n, k, num_experts, device, num_sms, \
                     /*pdl=*/true, stream, a_scales_ld)
  switch (config) {
    case 0: return FP8G_CALL(CfgV2_192x4);
    // K as a constant for the model's K (DeepSeek-V3's 7168 and 2048), V2 at run time otherwise.
    case 1: return k == 7168 ? FP8G_CALL(CfgV2_192x4_K<7168>)
                    : k == 2048 ? FP8G_CALL(CfgV2_192x4_K<2048>)
                                : FP8G_CALL(CfgV2_192x4);
    // Scales by TMA (MN-major a scales); K / 128 must be a multiple of 4 (run() checks).
    case 2: return FP8G_CALL(CfgV2_192x4_TS);
    case 3: return k == 7168 ? FP8G_CALL(CfgV2_192x4_K_TS<7168>)
                   : k == 2048 ? FP8G_CALL(CfgV2_192x4_K_TS<2048>)
                               : FP8G_CALL(CfgV2_192x4_TS);
    // B multicast between neighbouring m-tiles (DeepGEMM's cluster_m = 2), with and without constant K.
    case 4: return FP8G_CALL(CfgV4_192x4);
    case 5: return k == 7168 ? FP8G_CALL(CfgV4_192x4_K<7168>)
                   : k == 2048 ? FP8G_CALL(CfgV4_192x4_K<2048>)
                               : FP8G_CALL(CfgV4_192x4);
    default: return cudaErrorInvalidValue;
  }
#undef FP8G_CALL
}

void check_tensor(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim,
                  const torch::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The *_TS configs (scales by TMA), told by the name's suffix as run_gpu.py tells them.
bool is_tma_scales(int64_t config) {
  const std::string name = config_name((int)config);
  return name.size() >= 3 && name.compare(name.size() - 3, 3, "_TS") == 0;
}

// out[rows of e] = (a * a_scales)[rows of e] @ (b[e] * b_scales[e])^T, written in place into out.
// a_scales: [M, K/128], K-major (contiguous) for most configs; the *_TS configs take an MN-major view
// (strides (1, ld), ld >= M a multiple of 4: a transposed [K/128, ld] buffer) and K/128 % 4 == 0.
void run(const torch::Tensor& a, const torch::Tensor& a_scales, const torch::Tensor& b,
         const torch::Tensor& b_scales, const torch::Tensor& offsets, torch::Tensor& out, int64_t config) {
  check_tensor(a, "a", at::kFloat8_e4m3fn, 2, a);
  check_tensor(b, "b", at::kFloat8_e4m3fn, 3, a);
  TORCH_CHECK(a_scales.is_cuda() && a_scales.device() == a.device() && a_scales.scalar_type() == at::kFloat &&
                  a_scales.dim() == 2,
              "a_scales must be a float32 matrix on ", a.device());
  const bool mn_major = is_tma_scales(config);
  TORCH_CHECK(mn_major ? a_scales.stride(0) == 1 && a_scales.stride(1) % 4 == 0 : a_scales.is_contiguous(),
              mn_major ? "the *_TS configs take MN-major a_scales (strides (1, ld), ld % 4 == 0)"
                       : "a_scales must be contiguous (K-major)");
  check_tensor(b_scales, "b_scales", at::kFloat, 3, a);
  check_tensor(offsets, "offsets", at::kInt, 1, a);
  check_tensor(out, "out", at::kBFloat16, 2, a);
  const int64_t m = a.size(0), k = a.size(1), e = b.size(0), n = b.size(1);
  TORCH_CHECK(n % 128 == 0 && k % 128 == 0 && n > 0 && k > 0, "N and K must be positive multiples of 128");
  TORCH_CHECK(b.size(2) == k, "b must be [E, N, K=", k, "], got ", b.sizes());
  TORCH_CHECK(e >= 1 && e <= kMaxExperts, "1 <= E <= 1024");
  TORCH_CHECK(offsets.size(0) == e + 1, "offsets must be [E+1]");
  TORCH_CHECK(a_scales.size(0) == m && a_scales.size(1) == k / 128, "a_scales must be [M, K/128]");
  TORCH_CHECK(b_scales.size(0) == e && b_scales.size(1) == n / 128 && b_scales.size(2) == k / 128,
              "b_scales must be [E, N/128, K/128]");
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "out must be [M, N]");
  TORCH_CHECK(config >= 0 && config < kNumConfigs, "config out of range");
  TORCH_CHECK(!mn_major || (k / 128) % 4 == 0, "the *_TS configs need K / 128 to be a multiple of 4");
  if (m == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  static int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t err =
      run_config((int)config, a.data_ptr(), a_scales.data_ptr<float>(), b.data_ptr(), b_scales.data_ptr<float>(),
                 offsets.data_ptr<int32_t>(), out.data_ptr(), m, (int)n, (int)k, (int)e, a.get_device(), num_sms,
                 at::cuda::getCurrentCUDAStream(), mn_major ? a_scales.stride(1) : 0);
  TORCH_CHECK(err == cudaSuccess, "fp8_grouped_run failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "FP8 grouped GEMM prototype (in place into out)", py::arg("a"), py::arg("a_scales"),
        py::arg("b"), py::arg("b_scales"), py::arg("offsets"), py::arg("out"), py::arg("config"));
  m.attr("num_configs") = kNumConfigs;
  m.def("config_name", [](int c) { return std::string(config_name(c)); });
}
