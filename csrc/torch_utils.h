// Helpers for the launchers (the torch-facing side): argument checks whose messages name the op,
// the argument, what was expected and what came; CUDA status checks; dtype dispatch; row alignment.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <sstream>
#include <string>

namespace moe_kernels {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// The dtype as Python spells it ("bfloat16", "int32"), so C++ and Python messages read the same.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: {
      return "bfloat16";
    }
    case at::kHalf: {
      return "float16";
    }
    case at::kFloat: {
      return "float32";
    }
    case at::kDouble: {
      return "float64";
    }
    case at::kInt: {
      return "int32";
    }
    case at::kLong: {
      return "int64";
    }
    case at::ScalarType::Float8_e4m3fn: {
      return "float8_e4m3fn";
    }
    default: {
      return c10::toString(dtype);
    }
  }
}

// The kernels are built for sm_90a only; say so instead of failing with "no kernel image".
inline void check_hopper(const at::Tensor& t, const char* op) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.get_device());
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, op,
              ": moe_kernels is built for Hopper GPUs (sm_90a), but ", t.device(), " is ", prop->name,
              " (sm_", prop->major, prop->minor, ")");
}

}  // namespace moe_kernels

// MK_CHECK(cond, "op", "message", ...): ValueError for bad arguments.
#define MK_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)

#define MK_CHECK_CUDA_TENSOR(t, op, name) \
  MK_CHECK((t).is_cuda(), op, name " must be a CUDA tensor, got device ", (t).device());

#define MK_CHECK_DIM(t, n, op, name, layout) \
  MK_CHECK((t).dim() == (n), op, name " must be " #n "-D " layout ", got shape ", ::moe_kernels::shape_str(t))

#define MK_CHECK_DTYPE(t, dtype, op, name)                                                     \
  MK_CHECK((t).scalar_type() == (dtype), op, name " must be ", c10::toString(dtype), ", got ", \
           (t).scalar_type())

#define MK_CHECK_SAME_DEVICE(a, b, op, name_a, name_b)                                                  \
  MK_CHECK((a).device() == (b).device(), op, name_a " and " name_b " must be on the same device, got ", \
           (a).device(), " and ", (b).device())

// Every CUDA status is checked and reported by name.
#define MK_CUDA_CHECK(expr, op)                                                               \
  do {                                                                                        \
    const cudaError_t mk_err_ = (expr);                                                       \
    TORCH_CHECK(mk_err_ == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(mk_err_), " (", \
                cudaGetErrorString(mk_err_), ") at " __FILE__ ":", __LINE__);                 \
  } while (0)

namespace moe_kernels {

constexpr auto kFp8 = at::ScalarType::Float8_e4m3fn;

// Calls f with a null pointer of the C++ element type of `dtype` (bf16, fp16 or fp32).
template <typename F>
void dispatch_float_type(at::ScalarType dtype, const char* op, const char* name, F&& f) {
  switch (dtype) {
    case at::ScalarType::BFloat16: {
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    }
    case at::ScalarType::Half: {
      f(static_cast<__half*>(nullptr));
      break;
    }
    case at::ScalarType::Float: {
      f(static_cast<float*>(nullptr));
      break;
    }
    default: {
      MK_CHECK(false, op, name, " must be bfloat16, float16 or float32, got ", dtype);
    }
  }
}

// The vector kernels read 16 bytes at a time: a misaligned view is copied rather than misread.
inline at::Tensor aligned_rows(const at::Tensor& x) {
  const bool ok = x.stride(-1) == 1 && (x.stride(0) * x.element_size()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (ok) {
    return x;
  }
  return x.is_contiguous() ? x.clone() : x.contiguous();
}

}  // namespace moe_kernels
