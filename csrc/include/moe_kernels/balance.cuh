// Balance losses of DeepSeekMoE / V2 / V3 and the auxiliary-loss-free bias update (framework-free).
//
// For sequence s (the whole batch unless sequence offsets are given), with T_s tokens, n_ti the
// normalised score s_ti / (sum_j s_tj + eps) and c_si the slots of s routed to expert i:
//   f_si = E c_si / (K T_s),   P_si = sum_{t in s} n_ti / T_s
//   device-level: f~_si = mean of f_sj over expert i's device group (expert-level: f~ = f)
//   loss = alpha / S * sum_s sum_i f~_si P_si = sum_s sum_i coeff_si * sum_{t in s} n_ti,
//   coeff_si = alpha f~_si / (T_s S)          (d loss / d n_ti, saved for the backward)
//
// Three kernels: per-token statistics (warps walk contiguous token chunks and flush per-sequence
// partial sums as 2^-32 fixed-point integers, so the result does not depend on atomic order), a
// one-block finalisation, and the backward into the logits.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "moe_kernels/device_error.cuh"
#include "moe_kernels/router.cuh"

namespace moe_kernels {
namespace balance {

constexpr int kWarpsPerBlock = 8;
constexpr int kFinalizeThreads = 1024;
constexpr double kFixedPointScale = 4294967296.0;  // 2^32

struct Params {
  const void* logits;          // [T, E]
  const int32_t* ids;          // [T, K] (int32)
  const int32_t* seq_offsets;  // [S + 1] non-decreasing from 0 to T, or nullptr (one sequence)
  int64_t num_tokens;
  int num_experts, top_k, vpt, num_seqs;
  int experts_per_device;  // E for the expert-level loss
  bool vectorized;
  float alpha;
  int32_t* counts;           // [S, E] zeroed
  unsigned long long* psum;  // [S, E] zeroed, fixed point
  float* coeffs;             // [S, E]
  float* loss;               // []
  const float* grad_loss;    // [] (backward)
  void* grad_logits;         // [T, E] (backward)
  int* error_flag;           // the sticky device-error flag
};

// Index of the sequence holding token t (offsets[s] <= t < offsets[s + 1]).
__device__ __forceinline__ int sequence_of(const Params& p, int64_t t) {
  if (p.seq_offsets == nullptr) {
    return 0;
  }
  int lo = 0, hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.seq_offsets[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ int64_t sequence_end(const Params& p, int s) {
  return p.seq_offsets == nullptr ? p.num_tokens : p.seq_offsets[s + 1];
}

// The normalised scores n_t of the warp's token: the router's scores divided by their sum.
template <typename T, int kMaxVpt, bool kSigmoid>
__device__ __forceinline__ float normalised_scores(const Params& p, int64_t t, int first_expert,
                                                   float (&score)[kMaxVpt]) {
  using namespace router;
  load_row<T, kMaxVpt>(static_cast<const T*>(p.logits) + t * p.num_experts, p.vpt, first_expert,
                       p.num_experts, p.vectorized, score);
  float sum = 0.0f;
  if constexpr (kSigmoid) {
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      const bool real = i < p.vpt && first_expert + i < p.num_experts;
      score[i] = real ? sigmoid(score[i]) : 0.0f;
      sum += score[i];
    }
  } else {
    const SoftmaxStats stats = softmax_stats<kMaxVpt>(score, p.vpt, first_expert, p.num_experts);
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      const bool real = i < p.vpt && first_expert + i < p.num_experts;
      score[i] = real ? softmax_score(score[i], stats) : 0.0f;
      sum += score[i];
    }
  }
  return warp_sum(sum) + kRenormEps;  // D_t
}

template <typename T, int kMaxVpt, bool kSigmoid>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) balance_stats_kernel(const Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const int64_t chunk = (p.num_tokens + warps - 1) / warps;
  const int64_t begin = warp * chunk, end = min(p.num_tokens, begin + chunk);
  if (p.seq_offsets != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {  // corrupt offsets: reported
    bool ok = p.seq_offsets[0] == 0 && p.seq_offsets[p.num_seqs] == p.num_tokens;
    for (int s = 0; s < p.num_seqs; ++s) {
      ok = ok && p.seq_offsets[s] <= p.seq_offsets[s + 1];
    }
    if (!ok) {
      report_device_error(p.error_flag, kBalanceBadSeqOffsets);
    }
  }
  if (begin >= end) {
    return;
  }
  const int first_expert = lane * p.vpt;
  int seq = sequence_of(p, begin);
  int64_t seq_end = sequence_end(p, seq);
  float acc[kMaxVpt] = {};
  auto flush = [&]() {
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      if (i < p.vpt && first_expert + i < p.num_experts && acc[i] != 0.0f) {
        atomicAdd(&p.psum[int64_t(seq) * p.num_experts + first_expert + i],
                  static_cast<unsigned long long>(__double2ll_rn(double(acc[i]) * kFixedPointScale)));
      }
      acc[i] = 0.0f;
    }
  };
  for (int64_t t = begin; t < end; ++t) {
    while (t >= seq_end) {  // crossed into the next (possibly empty) sequence
      flush();
      if (seq + 1 >= p.num_seqs) {  // offsets end before T: never index past them (reported above)
        return;
      }
      ++seq;
      seq_end = sequence_end(p, seq);
    }
    float score[kMaxVpt];
    const float inv_denominator = 1.0f / normalised_scores<T, kMaxVpt, kSigmoid>(p, t, first_expert, score);
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      acc[i] += score[i] * inv_denominator;
    }
    if (lane < p.top_k) {
      const int id = p.ids[t * p.top_k + lane];
      if (id >= 0 && id < p.num_experts) {
        atomicAdd(&p.counts[int64_t(seq) * p.num_experts + id], 1);
      } else {
        report_device_error(p.error_flag, kBalanceExpertIdOutOfRange);
      }
    }
  }
  flush();
}

// One block: per (sequence, expert) coefficient and the loss, summed in a fixed order.
__global__ void __launch_bounds__(kFinalizeThreads) balance_finalize_kernel(const Params p) {
  __shared__ float partial[kFinalizeThreads / 32];
  const int64_t total = int64_t(p.num_seqs) * p.num_experts;
  float loss = 0.0f;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int s = idx / p.num_experts, e = idx % p.num_experts;
    const int64_t seq_tokens =
        p.seq_offsets == nullptr ? p.num_tokens : p.seq_offsets[s + 1] - p.seq_offsets[s];
    float coeff = 0.0f;
    if (seq_tokens > 0) {
      // f~: mean count over the expert's device group, times E / (K T_s).
      const int group_start = e / p.experts_per_device * p.experts_per_device;
      int64_t group_count = 0;
      for (int j = 0; j < p.experts_per_device; ++j) {
        group_count += p.counts[int64_t(s) * p.num_experts + group_start + j];
      }
      const double f = double(p.num_experts) * double(group_count) / p.experts_per_device /
                       (double(p.top_k) * double(seq_tokens));
      coeff = float(double(p.alpha) * f / (double(seq_tokens) * p.num_seqs));
      loss += coeff * float(double(p.psum[idx]) / kFixedPointScale);
    }
    p.coeffs[idx] = coeff;
  }
  loss = router::warp_sum(loss);
  if (threadIdx.x % 32 == 0) {
    partial[threadIdx.x / 32] = loss;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    loss = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
    loss = router::warp_sum(loss);
    if (threadIdx.x == 0) {
      *p.loss = loss;
    }
  }
}

// d loss / d logits: g_s_j = (coeff_j - sum_i coeff_i n_i) / D, then through the score function.
template <typename T, int kMaxVpt, bool kSigmoid>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) balance_backward_kernel(const Params p) {
  const int lane = threadIdx.x % 32;
  const int first_expert = lane * p.vpt;
  const float grad_loss = *p.grad_loss;
  T* grad_logits = static_cast<T*>(p.grad_logits);
  for (int64_t t = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32; t < p.num_tokens;
       t += int64_t(gridDim.x) * kWarpsPerBlock) {
    const float* coeff = p.coeffs + int64_t(sequence_of(p, t)) * p.num_experts;
    float score[kMaxVpt], c[kMaxVpt];
    const float denominator = normalised_scores<T, kMaxVpt, kSigmoid>(p, t, first_expert, score);
    float weighted = 0.0f;  // sum_i coeff_i s_i
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      const bool real = i < p.vpt && first_expert + i < p.num_experts;
      c[i] = real ? coeff[first_expert + i] * grad_loss : 0.0f;
      weighted += c[i] * score[i];
    }
    weighted = router::warp_sum(weighted) / denominator;
    float grad_score[kMaxVpt];
    float dot = 0.0f;  // sum_j g_s_j s_j (softmax)
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      grad_score[i] = (c[i] - weighted) / denominator;
      dot += grad_score[i] * score[i];
    }
    if constexpr (!kSigmoid) {
      dot = router::warp_sum(dot);
    }
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      if (i < p.vpt && first_expert + i < p.num_experts) {
        const float g =
            kSigmoid ? grad_score[i] * score[i] * (1.0f - score[i]) : score[i] * (grad_score[i] - dot);
        grad_logits[t * p.num_experts + first_expert + i] = from_float<T>(g);
      }
    }
  }
}

// bias_i += rate * sign(sum(counts) - E * counts_i): exact integer sign, one fp32 add. One block.
template <typename CountT>
__global__ void __launch_bounds__(1024)
    update_expert_bias_kernel(float* bias, const CountT* counts, int num_experts, float rate) {
  __shared__ long long partial[32];
  long long sum = 0;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    sum += counts[e];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  if (threadIdx.x % 32 == 0) {
    partial[threadIdx.x / 32] = sum;
  }
  __syncthreads();
  sum = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    sum += partial[w];
  }
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const long long diff = sum - static_cast<long long>(num_experts) * counts[e];
    const float direction = diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f);
    bias[e] = __fadd_rn(bias[e], __fmul_rn(rate, direction));
  }
}

}  // namespace balance
}  // namespace moe_kernels
