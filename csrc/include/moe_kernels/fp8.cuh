// FP8 (e4m3) quantisation math shared by every kernel that writes FP8: one definition of the scale
// and of the rounding, matching moe_kernels/reference.py bit for bit.
#pragma once

#include <cfloat>
#include <cuda_fp8.h>
#include <cstdint>

namespace moe_kernels {

constexpr float kFp8Max = 448.0f;  // largest finite e4m3 value
constexpr int kQuantBlock = 128;   // channels per scale (1x128 activations, 128x128 weights)

// |x| for the amax, with non-finite values ignored so one inf or NaN does not wipe out its group.
__device__ __forceinline__ float finite_abs(float x) {
  const float a = fabsf(x);
  return a <= FLT_MAX ? a : 0.0f;  // false for NaN and inf
}

// Scale of a group from its amax: amax / 448 (correctly rounded), 1 for an all-zero group, at
// least FLT_MIN so its inverse stays finite; optionally rounded up to a power of two.
__device__ __forceinline__ float fp8_scale(float amax, bool pow2) {
  if (amax == 0.0f) {
    return 1.0f;
  }
  float scale = fmaxf(amax / kFp8Max, FLT_MIN);
  if (pow2) {
    uint32_t bits = __float_as_uint(scale);
    if (bits & 0x007fffffu) {
      bits = (bits & 0xff800000u) + 0x00800000u;
    }
    scale = __uint_as_float(bits);
  }
  return scale;
}

// What each value is multiplied by before rounding: 1 / scale, correctly rounded. (A multiply per
// value instead of a division keeps the memory-bound kernels memory-bound.)
__device__ __forceinline__ float fp8_inverse_scale(float scale) {
  return 1.0f / scale;
}

// Round x * inv_scale to e4m3, nearest-even, saturating finite overflow and inf to +-448; NaN stays NaN.
__device__ __forceinline__ __nv_fp8x2_storage_t quantize_pair(float a, float b, float inv_scale) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a * inv_scale, b * inv_scale), __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float2 dequantize_pair(__nv_fp8x2_storage_t pair, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return make_float2(f.x * scale, f.y * scale);
}

}  // namespace moe_kernels
