// Launchers of the grouped GEMMs (forward, BF16 dgrad, BF16 and FP8 wgrad): argument checks, the
// tile-configuration heuristic, the workspace (from torch's caching allocator, so it is allocated
// once and graph-safe), the current stream.
#include "common/device_error.h"
#include "moe_kernels/bf16_grouped_sm90.cuh"
#include "moe_kernels/env.h"
#include "moe_kernels/fp8_grouped_sm90.cuh"
#include "moe_kernels/grouped_gemm.h"
#include "torch_utils.h"

namespace moe_kernels {
namespace gemm {
namespace {

// A GEMM output. compute-sanitizer's initcheck does not see the CUTLASS epilogue's TMA stores (nor
// cuBLAS's), so every later read of a GEMM output looks uninitialised to it. With
// MOE_KERNELS_INITCHECK=1 in the environment (scripts/sanitize.sh sets it for initcheck only) the
// outputs are allocated zero-filled, so that initcheck still checks every other buffer; the GEMM
// overwrites them all the same (the tests compare every output row with the reference).
at::Tensor gemm_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool initcheck = env_int("MOE_KERNELS_INITCHECK", 0) == 1;
  return initcheck ? at::zeros(sizes, options) : at::empty(sizes, options);
}

constexpr int kBlock = 128;

// Every tile configuration, each compiled in its own translation unit: CUTLASS instantiations, and
// fp8_wgmma_* / bf16_wgmma_* (our own kernels, moe_kernels/{fp8,bf16}_grouped_sm90.cuh).
struct GemmConfig {
  const char* name;
  bool fp8;
  size_t (*workspace_bytes)(const GroupedGemmProblem&, int);
  cudaError_t (*run)(const GroupedGemmProblem&, void*, int, cudaStream_t);
};

#define MOE_GEMM_CONFIG(name, fp8) {#name, fp8, &name##_workspace_bytes, &name##_run}
constexpr GemmConfig kConfigs[] = {
    MOE_GEMM_CONFIG(fp8_cooperative_128x128, true),
    MOE_GEMM_CONFIG(fp8_pingpong_64x128, true),
    MOE_GEMM_CONFIG(fp8_wgmma_128x192, true),
    MOE_GEMM_CONFIG(fp8_wgmma_kc_128x192, true),
    MOE_GEMM_CONFIG(fp8_wgmma_2cta_kc_128x192, true),
    MOE_GEMM_CONFIG(fp8_wgmma_mpair_kc_128x192, true),
    MOE_GEMM_CONFIG(fp8_wgmma_tall_kc_128x128, true),
    MOE_GEMM_CONFIG(fp8_wgmma_tall_b6_kc_128x128, true),
    MOE_GEMM_CONFIG(fp8_wgmma_tall_b8_kc_128x128, true),
    MOE_GEMM_CONFIG(fp8_wgmma_tall_b6_swap_kc_128x128, true),
    MOE_GEMM_CONFIG(bf16_cooperative_128x128, false),
    MOE_GEMM_CONFIG(bf16_cooperative_128x256, false),
    MOE_GEMM_CONFIG(bf16_pingpong_64x128, false),
    MOE_GEMM_CONFIG(bf16_wgmma_128x256, false),
};
// The dgrad's configurations (BF16, the weight read untransposed), chosen by the same rule.
constexpr GemmConfig kDgradConfigs[] = {
    MOE_GEMM_CONFIG(bf16_dgrad_pingpong_64x128, false),
    MOE_GEMM_CONFIG(bf16_dgrad_cooperative_128x256, false),
};
// The wgrad's configurations: the cooperative tiles for either output type ("auto"), and pingpong
// tiles (bf16 out) that overlap each tile's epilogue with the other's MMAs.
struct WgradConfig {
  const char* name;
  bool fp8, fp32_out;
  size_t (*workspace_bytes)(const WgradProblem&, int);
  cudaError_t (*run)(const WgradProblem&, void*, int, cudaStream_t);
};
#define MOE_WGRAD_CONFIG(name, fp8, fp32_out) {#name, fp8, fp32_out, &name##_workspace_bytes, &name##_run}
constexpr WgradConfig kWgradConfigs[] = {
    MOE_WGRAD_CONFIG(bf16_wgrad_bf16_out, false, false),
    MOE_WGRAD_CONFIG(bf16_wgrad_fp32_out, false, true),
    MOE_WGRAD_CONFIG(fp8_wgrad_bf16_out, true, false),
    MOE_WGRAD_CONFIG(fp8_wgrad_fp32_out, true, true),
    MOE_WGRAD_CONFIG(bf16_wgrad_pingpong_64x256, false, false),
    MOE_WGRAD_CONFIG(fp8_wgrad_pingpong_64x128, true, false),
};
#undef MOE_WGRAD_CONFIG

// "auto": the cooperative configuration of the operand and output types; "pingpong": the pingpong one.
const WgradConfig& choose_wgrad_config(bool fp8, bool fp32_out, c10::string_view requested, const char* op) {
  MK_CHECK(requested == "auto" || requested == "pingpong", op, "config must be 'auto' or 'pingpong', got '",
           requested, "'");
  const bool pingpong = requested == "pingpong";
  MK_CHECK(!(pingpong && fp32_out), op, "the pingpong configuration writes bfloat16 only");
  for (const WgradConfig& c : kWgradConfigs) {
    const bool is_pingpong = c10::string_view(c.name).find("pingpong") != c10::string_view::npos;
    if (c.fp8 == fp8 && c.fp32_out == fp32_out && is_pingpong == pingpong) {
      return c;
    }
  }
  return kWgradConfigs[0];
}
#undef MOE_GEMM_CONFIG

const GemmConfig& config_named(c10::string_view name) {
  for (const GemmConfig& c : kConfigs) {
    if (name == c.name) {
      return c;
    }
  }
  std::string names;  // from the table itself, so the message never lists a removed configuration
  for (const GemmConfig& c : kConfigs) {
    names += names.empty() ? c.name : std::string(", ") + c.name;
  }
  MK_CHECK(false, "grouped_gemm", "config must be 'auto' or one of ", names, "; got '", name, "'");
  return kConfigs[0];
}

// The heuristic: rows per expert, known on the host as M / E (never read from device counts).
// Up to 64 rows per expert (decode, small batches) a 64-row Pingpong tile wastes less of each
// expert's last tile and overlaps epilogues with MMAs. Beyond, for FP8, our own kernel with
// 128x192 tiles, one CTA per tile and K compiled in for the common K (fp8_wgmma_kc_128x192): in one
// interleaved run (H100, 2026-12-07, bench/results/h100/grouped_gemm.json) 7-18% faster than with
// K at run time on every EP8 row and Qwen3's gate_up, and within 4% of the fastest configuration
// on every row above 64 rows per expert. The clusters were not better overall: sharing the weight
// tile between m-tile pairs (fp8_wgmma_mpair_kc_128x192) gained 4% with 256 experts (gate_up,
// realistic) and lost 3-16% on the skewed, down, 256-expert balanced and Qwen3 rows; sharing the
// A tile (fp8_wgmma_2cta_*, chosen below 192 rows per expert until then) lost 3-12% on the
// realistic 256-expert rows; its run-time-K configuration (fp8_wgmma_2cta_128x192) was removed,
// the kernel stays as fp8_wgmma_2cta_kc_128x192's fallback for other K. The seventh session's split tails
// (fp8_wgmma_*ns*; still in the prototype) were 1-26% slower on every realistic row and were removed.
// Up to 160 rows per expert, the same kernel on 128x128 tiles whose last m-tile of an expert takes
// up to 192 rows (fp8_wgmma_tall_kc_128x128): there the weight stream bounds the time, and under
// realistic loads half of the experts would otherwise stream their weights twice for a nearly
// empty second tile. Measured (H100, 2026-12-08, one process): 12% faster than
// fp8_wgmma_kc_128x192 at 128 rows per expert (256 experts, gate_up 2926 against 3309 us, down
// 1559 against 1696; balanced 2770 against 2817), 29-56% slower at 256 and 1024 rows per expert
// (Qwen3, EP8), where BN = 128 costs compute; the boundary between 128 and 256 is not measured.
// CUTLASS's 128x128 Cooperative tile with a 1x2 cluster where our kernel does not apply (more than
// 1024 experts, 32-bit scale indices). BF16: our own kernel (bf16_wgmma_128x256: a 128x256 tile,
// 3 stages, the whole tile staged for the TMA store) above 64 rows per expert where it applies
// (faster than CUTLASS's Cooperative 128x256 on every row of the benchmark: 1-29% on an H100,
// 2-11% in its prototype's H200 run), that CUTLASS tile where it does not. a, b and out are the
// pointers the kernel will read (a and b already 16-byte aligned by aligned_rows).
const GemmConfig& choose_config(bool fp8, int64_t m_total, int64_t n, int64_t k, int64_t num_experts,
                                const void* a, const void* b, const void* out, c10::string_view requested) {
  const bool wgmma_ok = fp8 ? fp8g::fp8_grouped_supports(m_total, n, k, num_experts, out)
                            : bf16g::bf16_grouped_supports(m_total, n, k, num_experts, a, b, out);
  if (requested != "auto") {
    const GemmConfig& c = config_named(requested);
    MK_CHECK(c.fp8 == fp8, "grouped_gemm", "config '", requested, "' does not match the operands' dtype");
    MK_CHECK(wgmma_ok || c10::string_view(c.name).find("wgmma") == c10::string_view::npos, "grouped_gemm",
             "config '", requested, "' takes at most ", fp8g::kMaxExperts,
             fp8 ? " experts and fewer than 2^31 scales per operand"
                 : " experts, fewer than 2^31 rows and fewer than 2^31 weight rows (experts x N)",
             "; use 'auto'");
    return c;
  }
  const bool small = m_total <= 64 * num_experts;
  if (fp8) {
    if (small) {
      return config_named("fp8_pingpong_64x128");
    }
    if (!wgmma_ok) {
      return config_named("fp8_cooperative_128x128");
    }
    if (m_total <= 160 * num_experts) {
      return config_named("fp8_wgmma_tall_kc_128x128");
    }
    return config_named("fp8_wgmma_kc_128x192");
  }
  if (small) {
    return config_named("bf16_pingpong_64x128");
  }
  return config_named(wgmma_ok ? "bf16_wgmma_128x256" : "bf16_cooperative_128x256");
}

// Runs a configuration with a workspace from torch's allocator on the current stream.
template <class Problem>
void run_config(const char* op, const char* name, const Problem& p, const at::Tensor& like,
                size_t (*workspace_bytes)(const Problem&, int),
                cudaError_t (*run)(const Problem&, void*, int, cudaStream_t)) {
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Zeroed (one small fill): CUTLASS's pointer-array epilogue copies whole 128-byte TMA descriptors
  // within its workspace of which it has set only the fields it uses, so compute-sanitizer's
  // initcheck saw reads of never-written bytes (harmless, but they hid any real report).
  at::Tensor workspace =
      at::zeros({static_cast<int64_t>(workspace_bytes(p, sm_count))}, like.options().dtype(at::kByte));
  const cudaError_t err = run(p, workspace.data_ptr(), sm_count, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": configuration ", name, " failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

void grouped_gemm_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                      const std::optional<at::Tensor>& a_scales, const std::optional<at::Tensor>& b_scales,
                      at::Tensor& out, c10::string_view config) {
  constexpr const char* op = "grouped_gemm";
  MK_CHECK_CUDA_TENSOR(a, op, "a");
  MK_CHECK_DIM(a, 2, op, "a", "[rows, K]");
  MK_CHECK_DIM(b, 3, op, "b", "[experts, N, K]");
  MK_CHECK_DIM(expert_offsets, 1, op, "expert_offsets", "[experts + 1]");
  const bool fp8 = a.scalar_type() == at::kFloat8_e4m3fn;
  MK_CHECK(fp8 || a.scalar_type() == at::kBFloat16, op, "a must be float8_e4m3fn or bfloat16, got ",
           a.scalar_type());
  MK_CHECK(b.scalar_type() == a.scalar_type(), op, "b must have a's dtype ", a.scalar_type(), ", got ",
           b.scalar_type());
  const int64_t m = a.size(0), k = a.size(1), num_experts = b.size(0), n = b.size(1);
  MK_CHECK(b.size(2) == k, op, "b must be [experts, N, K=", k, "], got shape ", shape_str(b));
  MK_CHECK(k % kBlock == 0 && k > 0, op, "K (a.shape[1]) must be a positive multiple of 128, got ", k);
  MK_CHECK(n % kBlock == 0 && n > 0, op, "N (b.shape[1]) must be a positive multiple of 128, got ", n);
  MK_CHECK(num_experts >= 1, op, "b must hold at least one expert");
  MK_CHECK_DTYPE(expert_offsets, at::kInt, op, "expert_offsets");
  MK_CHECK(expert_offsets.size(0) == num_experts + 1, op,
           "expert_offsets must be [experts + 1 = ", num_experts + 1, "], got shape ",
           shape_str(expert_offsets));
  MK_CHECK(a.is_contiguous() && b.is_contiguous(), op, "a and b must be contiguous");
  MK_CHECK_DTYPE(out, at::kBFloat16, op, "out");
  MK_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n && out.is_contiguous(), op,
           "out must be a contiguous [rows=", m, ", N=", n, "] tensor, got shape ", shape_str(out));
  MK_CHECK_SAME_DEVICE(b, a, op, "b", "a");
  MK_CHECK_SAME_DEVICE(expert_offsets, a, op, "expert_offsets", "a");
  MK_CHECK_SAME_DEVICE(out, a, op, "out", "a");
  MK_CHECK(fp8 == a_scales.has_value() && fp8 == b_scales.has_value(), op,
           fp8 ? "FP8 operands need a_scales and b_scales" : "bfloat16 operands take no scales");
  at::Tensor sa, sb;
  if (fp8) {
    sa = a_scales->contiguous();
    sb = b_scales->contiguous();
    MK_CHECK_DTYPE(sa, at::kFloat, op, "a_scales");
    MK_CHECK_DTYPE(sb, at::kFloat, op, "b_scales");
    MK_CHECK(sa.dim() == 2 && sa.size(0) == m && sa.size(1) == k / kBlock, op, "a_scales must be [rows=", m,
             ", K/128=", k / kBlock, "] (1x128 blocks), got shape ", shape_str(sa));
    MK_CHECK(
        sb.dim() == 3 && sb.size(0) == num_experts && sb.size(1) == n / kBlock && sb.size(2) == k / kBlock,
        op, "b_scales must be [experts=", num_experts, ", N/128=", n / kBlock, ", K/128=", k / kBlock,
        "] (128x128 blocks), got shape ", shape_str(sb));
    MK_CHECK_SAME_DEVICE(sa, a, op, "a_scales", "a");
    MK_CHECK_SAME_DEVICE(sb, a, op, "b_scales", "a");
  }
  MK_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0, op,
           "out must start at a 16-byte aligned address (TMA stores), got a view offset by ",
           reinterpret_cast<uintptr_t>(out.data_ptr()) % 16, " bytes");
  check_hopper(a, op);
  const c10::cuda::CUDAGuard guard(a.device());
  // TMA loads need 16-byte aligned bases: a view offset into its storage is copied (rare, so the
  // copy costs nothing in the usual case), offsets are made contiguous for the setup kernel.
  const at::Tensor a_base = aligned_rows(a), b_base = aligned_rows(b);
  const GemmConfig& cfg =
      choose_config(fp8, m, n, k, num_experts, a_base.data_ptr(), b_base.data_ptr(), out.data_ptr(), config);
  if (m == 0) {
    return;
  }
  const at::Tensor offsets = expert_offsets.contiguous();
  GroupedGemmProblem p{};
  p.a = a_base.data_ptr();
  p.b = b_base.data_ptr();
  p.out = out.data_ptr();
  p.a_scales = fp8 ? sa.data_ptr<float>() : nullptr;
  p.b_scales = fp8 ? sb.data_ptr<float>() : nullptr;
  p.expert_offsets = offsets.data_ptr<int32_t>();
  p.error_flag = device_error_flag();
  p.m_total = m;
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_experts = static_cast<int>(num_experts);
  p.device = a.get_device();
  run_config(op, cfg.name, p, a, cfg.workspace_bytes, cfg.run);
}

at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                        const std::optional<at::Tensor>& a_scales, const std::optional<at::Tensor>& b_scales,
                        c10::string_view config) {
  MK_CHECK(a.dim() == 2 && b.dim() == 3, "grouped_gemm", "a must be [rows, K] and b [experts, N, K], got ",
           shape_str(a), " and ", shape_str(b));
  at::Tensor out = gemm_output({a.size(0), b.size(1)}, a.options().dtype(at::kBFloat16));
  grouped_gemm_out(a, b, expert_offsets, a_scales, b_scales, out, config);
  return out;
}

void check_offsets(const at::Tensor& expert_offsets, int64_t num_experts, const at::Tensor& like,
                   const char* op) {
  MK_CHECK_DTYPE(expert_offsets, at::kInt, op, "expert_offsets");
  MK_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == num_experts + 1, op,
           "expert_offsets must be [experts + 1 = ", num_experts + 1, "], got shape ",
           shape_str(expert_offsets));
  MK_CHECK(expert_offsets.is_contiguous(), op, "expert_offsets must be contiguous");
  MK_CHECK_SAME_DEVICE(expert_offsets, like, op, "expert_offsets", "grad_out");
}

// grad_a [M, K] = grad_out[rows of e] @ b[e] for b [E, N, K] (BF16); rows outside the experts are 0.
at::Tensor grouped_gemm_dgrad(const at::Tensor& grad_out, const at::Tensor& b,
                              const at::Tensor& expert_offsets) {
  constexpr const char* op = "grouped_gemm_dgrad";
  MK_CHECK_CUDA_TENSOR(grad_out, op, "grad_out");
  MK_CHECK_DIM(grad_out, 2, op, "grad_out", "[rows, N]");
  MK_CHECK_DIM(b, 3, op, "b", "[experts, N, K]");
  MK_CHECK_DTYPE(grad_out, at::kBFloat16, op, "grad_out");
  MK_CHECK_DTYPE(b, at::kBFloat16, op, "b");
  const int64_t m = grad_out.size(0), n = b.size(1), k = b.size(2), num_experts = b.size(0);
  MK_CHECK(grad_out.size(1) == n, op, "grad_out must be [rows, N=", n, "], got shape ", shape_str(grad_out));
  MK_CHECK(k % kBlock == 0 && k > 0 && n % kBlock == 0 && n > 0, op,
           "b's N and K must be positive multiples of 128, got shape ", shape_str(b));
  MK_CHECK(num_experts >= 1, op, "b must hold at least one expert");
  MK_CHECK(grad_out.is_contiguous() && b.is_contiguous(), op, "grad_out and b must be contiguous");
  MK_CHECK_SAME_DEVICE(b, grad_out, op, "b", "grad_out");
  check_offsets(expert_offsets, num_experts, grad_out, op);
  check_hopper(grad_out, op);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor out = at::zeros({m, k}, grad_out.options());
  if (m == 0) {
    return out;
  }
  const bool small = m <= 64 * num_experts;
  const GemmConfig& cfg = kDgradConfigs[small ? 0 : 1];
  GroupedGemmProblem p{};
  p.a = grad_out.data_ptr();
  p.b = b.data_ptr();
  p.out = out.data_ptr();
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  p.error_flag = device_error_flag();
  p.m_total = m;
  p.n = static_cast<int>(k);  // this GEMM's output width and reduction (see GroupedGemmProblem)
  p.k = static_cast<int>(n);
  p.num_experts = static_cast<int>(num_experts);
  p.device = grad_out.get_device();
  run_config(op, cfg.name, p, grad_out, cfg.workspace_bytes, cfg.run);
  return out;
}

// Allocates the wgrad's [E, N, K] output and runs the configuration for its operand and output
// types (an all-empty problem just zeros the output).
at::Tensor run_wgrad(const char* op, WgradProblem p, const at::Tensor& like, bool fp8,
                     at::ScalarType out_dtype, c10::string_view config) {
  MK_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kFloat, op,
           "out_dtype must be bfloat16 or float32, got ", out_dtype);
  at::Tensor out = gemm_output({p.num_experts, p.n, p.k}, like.options().dtype(out_dtype));
  if (p.m_total == 0) {
    return out.zero_();
  }
  p.out = out.data_ptr();
  p.error_flag = device_error_flag();
  p.device = like.get_device();
  const WgradConfig& cfg = choose_wgrad_config(fp8, out_dtype == at::kFloat, config, op);
  run_config(op, cfg.name, p, like, cfg.workspace_bytes, cfg.run);
  return out;
}

// grad_b [E, N, K] = grad_out[rows of e]^T @ a[rows of e] (BF16 operands, fp32 accumulation).
at::Tensor grouped_gemm_wgrad(const at::Tensor& grad_out, const at::Tensor& a,
                              const at::Tensor& expert_offsets, at::ScalarType out_dtype,
                              c10::string_view config) {
  constexpr const char* op = "grouped_gemm_wgrad";
  MK_CHECK_CUDA_TENSOR(grad_out, op, "grad_out");
  MK_CHECK_DIM(grad_out, 2, op, "grad_out", "[rows, N]");
  MK_CHECK_DIM(a, 2, op, "a", "[rows, K]");
  MK_CHECK_DTYPE(grad_out, at::kBFloat16, op, "grad_out");
  MK_CHECK_DTYPE(a, at::kBFloat16, op, "a");
  const int64_t m = grad_out.size(0), n = grad_out.size(1), k = a.size(1);
  const int64_t num_experts = expert_offsets.dim() == 1 ? expert_offsets.size(0) - 1 : 0;
  MK_CHECK(a.size(0) == m, op, "a must have grad_out's ", m, " rows, got shape ", shape_str(a));
  MK_CHECK(k % kBlock == 0 && k > 0 && n % kBlock == 0 && n > 0, op,
           "N (grad_out.shape[1]) and K (a.shape[1]) must be positive multiples of 128, got ", n, " and ", k);
  MK_CHECK(num_experts >= 1, op, "expert_offsets must be [experts + 1] with at least one expert, got shape ",
           shape_str(expert_offsets));
  MK_CHECK(grad_out.is_contiguous() && a.is_contiguous(), op, "grad_out and a must be contiguous");
  MK_CHECK_SAME_DEVICE(a, grad_out, op, "a", "grad_out");
  check_offsets(expert_offsets, num_experts, grad_out, op);
  check_hopper(grad_out, op);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  WgradProblem p{};
  p.grad = grad_out.data_ptr();
  p.act = a.data_ptr();
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  p.m_total = m;
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_experts = static_cast<int>(num_experts);
  return run_wgrad(op, p, grad_out, /*fp8=*/false, out_dtype, config);
}

// The FP8 wgrad on operands from quantize_fp8_transposed (grad_t of grad_out [M, N], act_t of the
// activations [M, K], both with the same padded offsets).
at::Tensor grouped_gemm_wgrad_fp8(const at::Tensor& grad_t, const at::Tensor& grad_t_scales,
                                  const at::Tensor& act_t, const at::Tensor& act_t_scales,
                                  const at::Tensor& padded_offsets, int64_t n, int64_t k,
                                  at::ScalarType out_dtype, c10::string_view config) {
  constexpr const char* op = "grouped_gemm_wgrad_fp8";
  MK_CHECK_CUDA_TENSOR(grad_t, op, "grad_t");
  MK_CHECK(k % kBlock == 0 && k > 0 && n % kBlock == 0 && n > 0, op,
           "n and k must be positive multiples of 128, got ", n, " and ", k);
  const std::pair<const at::Tensor*, const char*> operands[] = {{&grad_t, "grad_t"}, {&act_t, "act_t"}};
  const std::pair<const at::Tensor*, const char*> scales[] = {{&grad_t_scales, "grad_t_scales"},
                                                              {&act_t_scales, "act_t_scales"}};
  const int64_t widths[] = {n, k};
  const int64_t capacity = grad_t.dim() == 1 ? grad_t.numel() / n : -1;
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *operands[i].first;
    const at::Tensor& s = *scales[i].first;
    const char* name = operands[i].second;
    const char* scales_name = scales[i].second;
    MK_CHECK(t.scalar_type() == kFp8, op, name, " must be float8_e4m3fn, got ", t.scalar_type());
    MK_CHECK(s.scalar_type() == at::kFloat, op, scales_name, " must be float32, got ", s.scalar_type());
    MK_CHECK(t.device() == grad_t.device() && s.device() == grad_t.device(), op, name, " and ", scales_name,
             " must be on grad_t's device ", grad_t.device());
    MK_CHECK(t.dim() == 1 && t.is_contiguous() && t.numel() == capacity * widths[i] && capacity % kBlock == 0,
             op, name, " must be quantize_fp8_transposed's flat output for ", widths[i],
             " channels and the capacity of grad_t, got shape ", shape_str(t));
    MK_CHECK(s.dim() == 1 && s.is_contiguous() && s.numel() == capacity / kBlock * widths[i], op, scales_name,
             " must be [", capacity / kBlock * widths[i], "], got shape ", shape_str(s));
  }
  const int64_t num_experts = padded_offsets.dim() == 1 ? padded_offsets.size(0) - 1 : 0;
  MK_CHECK(num_experts >= 1, op, "padded_offsets must be [experts + 1] with at least one expert, got shape ",
           shape_str(padded_offsets));
  check_offsets(padded_offsets, num_experts, grad_t, op);
  check_hopper(grad_t, op);
  const c10::cuda::CUDAGuard guard(grad_t.device());
  WgradProblem p{};
  p.grad = grad_t.data_ptr();
  p.act = act_t.data_ptr();
  p.grad_scales = grad_t_scales.data_ptr<float>();
  p.act_scales = act_t_scales.data_ptr<float>();
  p.expert_offsets = padded_offsets.data_ptr<int32_t>();
  p.m_total = capacity;
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_experts = static_cast<int>(num_experts);
  return run_wgrad(op, p, grad_t, /*fp8=*/true, out_dtype, config);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm);
  m.impl("grouped_gemm_out", &grouped_gemm_out);
  m.impl("grouped_gemm_dgrad", &grouped_gemm_dgrad);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad);
  m.impl("grouped_gemm_wgrad_fp8", &grouped_gemm_wgrad_fp8);
}

}  // namespace gemm
}  // namespace moe_kernels
