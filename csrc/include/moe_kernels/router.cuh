// Fused MoE router (framework-free): scores, expert bias, group-limited top-K, weights, histogram,
// and the backward into the logits. Semantics: DESIGN.md §2 and moe_kernels/reference.py `router`.
//
// One warp per token. Lane `l` owns the contiguous experts [l*vpt, (l+1)*vpt), vpt = ceil(E/32),
// kept in registers (kMaxVpt, a power of two >= vpt, sizes the arrays). Selection compares 32-bit
// order-preserving keys, so the warp-wide argmax of a top-K round is one redux.sync plus a ballot;
// ties go to the lowest lane and, inside a lane, to the lowest slot: the lower expert index.
// router_forward_pair_kernel routes two tokens per warp (16 lanes each) for sigmoid scores and
// E = 16 * kVpt, and router_forward_quad_kernel four (8 lanes each) for sigmoid scores, E = 256 and
// K <= 8, with the same results; see their comments.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "moe_kernels/pdl.cuh"
#include "moe_kernels/vec.cuh"

namespace moe_kernels {
namespace router {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopK = 16;
constexpr int kMaxGroups = 32;
constexpr float kRenormEps = 1e-20f;

struct ForwardParams {
  const void* logits;  // [T, E] bf16 / fp16 / fp32, rows contiguous
  const float* bias;   // [E] or nullptr: added for selection only
  float* weights;      // [T, K]
  int32_t* ids;        // [T, K]
  int32_t* counts;     // [E], zeroed by the launcher, or nullptr
  int64_t num_tokens;
  int num_experts, top_k, vpt;
  int num_groups, topk_groups, group_size;
  bool group_top2;         // group score: sum of the top two (DeepSeek-V3) or the max (V2)
  bool lane_local_groups;  // every lane's experts lie in one group and a group spans 2^n lanes
  int group_lanes_log2;    // n above (lane-local groups), else 0: one group score per lane
  bool renormalize;
  bool vectorized;  // rows can be loaded in 16-byte pieces (see load_row)
  float scaling_factor;
};

struct BackwardParams {
  const float* grad_weights;  // [T, K]
  const void* logits;         // [T, E]
  const int32_t* ids;         // [T, K]
  void* grad_logits;          // [T, E], logits' dtype
  int64_t num_tokens;
  int num_experts, top_k, vpt;
  bool renormalize;
  bool vectorized;
  float scaling_factor;
};

// Larger float -> larger key. NaN counts as -inf; -0 as +0. Key 0 is below every real value and
// marks slots that can never be picked (padding past E, experts already taken).
__device__ __forceinline__ uint32_t select_key(float v) {
  v = isnan(v) ? -INFINITY : v + 0.0f;
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ float nan_to_neg_inf(float x) {
  return isnan(x) ? -INFINITY : x;
}

// 1 / (1 + e^-x) with the fast exponential and reciprocal (a few ulp; -inf -> 0, +inf -> 1, and NaN
// -> 0, the score of -inf). __expf(-x) is ex2.approx(x * -log2(e)); its non-ftz form only differs
// (by handling results below 2^-126) where 1 + e^-x rounds to 1 anyway, so ex2.approx.ftz gives
// the same bits in 4 instructions instead of 7. The reciprocal of 1 + e^-x >= 1 lies in [0, 1], so
// the final saturating add changes nothing but NaN (to +0): one FMA-pipe instruction where
// nan_to_neg_inf beforehand costs two on the ALU pipe, the router's busiest.
__device__ __forceinline__ float sigmoid(float x) {
  float e, s;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * -0x1.715476p+0f));
  asm("add.sat.f32 %0, %1, 0f00000000;" : "=f"(s) : "f"(__fdividef(1.0f, 1.0f + e)));
  return s;
}

// Softmax of a row held by the warp: exp(l - max) / sum; when the max is not finite (a +inf logit,
// or nothing but -inf) the scores are uniform over the entries equal to the max.
struct SoftmaxStats {
  float max, inv_sum;
  bool finite_max;
};

__device__ __forceinline__ float softmax_numerator(float l, float row_max, bool finite_max) {
  return finite_max ? __expf(l - row_max) : (l == row_max ? 1.0f : 0.0f);
}

__device__ __forceinline__ float softmax_score(float l, const SoftmaxStats& s) {
  return softmax_numerator(l, s.max, s.finite_max) * s.inv_sum;
}

template <int kMaxVpt>
__device__ __forceinline__ SoftmaxStats softmax_stats(const float (&l)[kMaxVpt], int vpt, int first_expert,
                                                      int num_experts) {
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    row_max = fmaxf(row_max, l[i]);  // padding slots hold -inf
  }
  row_max = group_max<32>(row_max);
  const bool finite_max = isfinite(row_max);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    const bool real = i < vpt && first_expert + i < num_experts;
    sum += real ? softmax_numerator(l[i], row_max, finite_max) : 0.0f;
  }
  return {row_max, 1.0f / warp_sum(sum), finite_max};
}

// Loads the lane's slots of a logits row as fp32 (NaN -> -inf, padding -> -inf). With
// `vectorized` (vpt * sizeof(T) a multiple of 16 and rows 16-byte aligned) in 16-byte pieces.
template <typename T, int kMaxVpt>
__device__ __forceinline__ void load_row(const T* row, int vpt, int first_expert, int num_experts,
                                         bool vectorized, float (&v)[kMaxVpt]) {
  constexpr int kVec = Vec16<T>::kSize;
  if constexpr (kMaxVpt % kVec == 0) {
    if (vectorized) {
#pragma unroll
      for (int j = 0; j < kMaxVpt / kVec; ++j) {
        const bool real = j * kVec < vpt && first_expert < num_experts;
        Vec16<T> piece = {};
        if (real) {
          piece = *reinterpret_cast<const Vec16<T>*>(row + first_expert + j * kVec);
        }
#pragma unroll
        for (int q = 0; q < kVec; ++q) {
          v[j * kVec + q] = real ? nan_to_neg_inf(to_float(piece.v[q])) : -INFINITY;
        }
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    const bool real = i < vpt && first_expert + i < num_experts;
    v[i] = real ? nan_to_neg_inf(to_float(row[first_expert + i])) : -INFINITY;
  }
}

// Stores the lane's slots of a row (the inverse of load_row).
template <typename T, int kMaxVpt>
__device__ __forceinline__ void store_row(T* row, int vpt, int first_expert, int num_experts, bool vectorized,
                                          const float (&v)[kMaxVpt]) {
  constexpr int kVec = Vec16<T>::kSize;
  if constexpr (kMaxVpt % kVec == 0) {
    if (vectorized) {
#pragma unroll
      for (int j = 0; j < kMaxVpt / kVec; ++j) {
        if (j * kVec < vpt && first_expert < num_experts) {
          Vec16<T> piece;
#pragma unroll
          for (int q = 0; q < kVec; ++q) {
            piece.v[q] = from_float<T>(v[j * kVec + q]);
          }
          *reinterpret_cast<Vec16<T>*>(row + first_expert + j * kVec) = piece;
        }
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    if (i < vpt && first_expert + i < num_experts) {
      row[first_expert + i] = from_float<T>(v[i]);
    }
  }
}

// Top two of (a1 >= a2) and (b1 >= b2).
__device__ __forceinline__ void merge_top2(float& a1, float& a2, float b1, float b2) {
  const float hi = fmaxf(a1, b1);
  const float lo = a1 >= b1 ? fmaxf(a2, b1) : fmaxf(a1, b2);
  a1 = hi;
  a2 = lo;
}

// Score of group `group` seen by this lane (lane-local layout: one group per lane, 2^n lanes per
// group) — or, in the generic layout, of group `lane` computed by scanning shared memory.
template <int kMaxVpt>
__device__ __forceinline__ float group_score(const ForwardParams& p, const float (&sel)[kMaxVpt],
                                             float* warp_smem, int lane) {
  float best = -INFINITY, second = -INFINITY;
  if (p.lane_local_groups) {
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      if (i < p.vpt) {
        merge_top2(best, second, sel[i], -INFINITY);
      }
    }
    for (int offset = 1; offset < (1 << p.group_lanes_log2); offset *= 2) {
      const float other_best = __shfl_xor_sync(0xffffffffu, best, offset);
      const float other_second = __shfl_xor_sync(0xffffffffu, second, offset);
      merge_top2(best, second, other_best, other_second);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      if (i < p.vpt && lane * p.vpt + i < p.num_experts) {
        warp_smem[lane * p.vpt + i] = sel[i];
      }
    }
    __syncwarp();
    if (lane < p.num_groups) {
      const float* group = warp_smem + lane * p.group_size;
      for (int j = 0; j < p.group_size; ++j) {
        merge_top2(best, second, group[j], -INFINITY);
      }
    }
    __syncwarp();  // the smem row is rewritten by the next token
  }
  return p.group_top2 ? nan_to_neg_inf(best + second) : best;
}

// Masks every group but the best topk_groups to -inf. Group scores come from group_score; the
// winners are drawn by topk_groups rounds of warp argmax (ties to the lower group = lower lane).
template <int kMaxVpt>
__device__ __forceinline__ void mask_groups(const ForwardParams& p, float (&sel)[kMaxVpt],
                                            const int (&slot_group)[kMaxVpt], float* warp_smem, int lane) {
  const int my_group = lane >> p.group_lanes_log2;
  const bool has_group = my_group < p.num_groups;
  const float my_score = group_score<kMaxVpt>(p, sel, warp_smem, lane);
  // Every real score, -inf included, has a key above 0, the key of lanes with no group.
  uint32_t alive = has_group ? select_key(my_score) : 0u;
  bool kept = false;
  for (int r = 0; r < p.topk_groups; ++r) {
    const uint32_t best = __reduce_max_sync(0xffffffffu, alive);
    const int winner_group = (__ffs(__ballot_sync(0xffffffffu, alive == best)) - 1) >> p.group_lanes_log2;
    if (my_group == winner_group) {
      kept = true;
      alive = 0;
    }
  }
  if (p.lane_local_groups) {
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      sel[i] = kept ? sel[i] : -INFINITY;
    }
  } else {
    const uint32_t kept_groups = __ballot_sync(0xffffffffu, kept);
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      sel[i] = (kept_groups >> slot_group[i]) & 1u ? sel[i] : -INFINITY;
    }
  }
}

struct Candidate {
  uint32_t key;
  int id;
  float score;
};

// Top-K through a threshold: tau = the K-th largest of the 32 lane maxima. At least K experts reach
// tau and none below it can be in the top K, so only the (usually few) experts >= tau are ranked:
// compacted in expert order into shared memory, one per lane, each ranked against all the others.
// Returns false, having done nothing, when more than 32 experts reach tau (ties, masked rows).
template <int kMaxVpt>
__device__ __forceinline__ bool select_from_candidates(int top_k, const uint32_t (&key)[kMaxVpt],
                                                       const float (&score)[kMaxVpt], int first_expert,
                                                       int lane, Candidate* warp_candidates, int& my_id,
                                                       float& my_weight) {
  uint32_t lane_max = 0;
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    lane_max = max(lane_max, key[i]);
  }
  uint32_t alive = lane_max, tau = 0;
  for (int k = 0; k < top_k; ++k) {
    tau = __reduce_max_sync(0xffffffffu, alive);
    if (lane == __ffs(__ballot_sync(0xffffffffu, alive == tau)) - 1) {
      alive = 0;
    }
  }
  int count = 0;
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    count += key[i] >= tau && key[i] != 0u;
  }
  if (__reduce_add_sync(0xffffffffu, count) > 32) {
    return false;
  }
  int position = count;  // inclusive prefix sum over lanes, then exclusive
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, position, offset);
    position += lane >= offset ? other : 0;
  }
  const int num_candidates = __shfl_sync(0xffffffffu, position, 31);
  position -= count;
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    if (key[i] >= tau && key[i] != 0u) {
      warp_candidates[position++] = {key[i], first_expert + i, score[i]};
    }
  }
  __syncwarp();
  const Candidate mine = lane < num_candidates ? warp_candidates[lane] : Candidate{0u, 0, 0.0f};
  // Rank: candidates above, plus equal ones earlier in expert order (lower index wins ties).
  int rank = 0;
  for (int j = 0; j < num_candidates; ++j) {
    const uint32_t other = __shfl_sync(0xffffffffu, mine.key, j);
    rank += other > mine.key || (other == mine.key && j < lane);
  }
  __syncwarp();  // everyone has read its candidate: the slots now take the picks, in rank order
  if (lane < num_candidates && rank < top_k) {
    warp_candidates[rank] = mine;
  }
  __syncwarp();
  const Candidate pick = warp_candidates[lane < top_k ? lane : 0];
  my_id = pick.id;
  my_weight = pick.score;
  __syncwarp();  // the slots are rewritten by the next token
  return true;
}

// Top-K by K rounds of warp argmax over every expert: the general path (heavy ties, -inf rows).
template <int kMaxVpt>
__device__ __forceinline__ void select_by_rounds(int top_k, uint32_t (&key)[kMaxVpt],
                                                 const float (&score)[kMaxVpt], int first_expert, int lane,
                                                 int& my_id, float& my_weight) {
  for (int k = 0; k < top_k; ++k) {
    uint32_t best = 0;
    int best_slot = 0;
    float best_score = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      if (key[i] > best) {
        best = key[i];
        best_slot = i;
        best_score = score[i];
      }
    }
    const uint32_t warp_best = __reduce_max_sync(0xffffffffu, best);
    const int winner = __ffs(__ballot_sync(0xffffffffu, best == warp_best)) - 1;
    if (lane == winner) {
#pragma unroll
      for (int i = 0; i < kMaxVpt; ++i) {
        key[i] = i == best_slot ? 0u : key[i];
      }
    }
    const int id = __shfl_sync(0xffffffffu, first_expert + best_slot, winner);
    const float w = __shfl_sync(0xffffffffu, best_score, winner);
    if (lane == k) {
      my_id = id;
      my_weight = w;
    }
  }
}

// The block's expert histogram in shared memory: zeroed at the start (when counts are wanted), then
// added to the global counts once at the end, so the per-token atomics stay in shared memory.
__device__ __forceinline__ void zero_block_counts(const ForwardParams& p, int32_t* block_counts,
                                                  int experts) {
  if (p.counts != nullptr) {
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
      block_counts[e] = 0;
    }
    __syncthreads();
  }
}

// The launcher zeroes the counts right before the kernel and launches it with programmatic
// dependent launch (pdl.cuh), so the kernel starts while that fill drains; it waits for the fill
// only here. Its earlier reads (logits, bias) were complete before the fill began.
__device__ __forceinline__ void flush_block_counts(const ForwardParams& p, const int32_t* block_counts,
                                                   int experts) {
  if (p.counts != nullptr) {
    pdl_wait();
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
      if (block_counts[e] != 0) {
        atomicAdd(&p.counts[e], block_counts[e]);
      }
    }
  }
}

template <typename T, int kMaxVpt, bool kSigmoid>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_forward_kernel(const ForwardParams p) {
  extern __shared__ float group_smem[];  // [warps][E] in the generic group layout, else empty
  __shared__ int32_t block_counts[kMaxExperts];
  __shared__ Candidate candidates[kWarpsPerBlock][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int first_expert = lane * p.vpt;
  float* warp_smem = group_smem + warp * p.num_experts;
  Candidate* warp_candidates = candidates[warp];
  zero_block_counts(p, block_counts, p.num_experts);

  // Per-lane constants, loaded once: the bias of the lane's experts and each slot's group.
  float bias[kMaxVpt];
  int slot_group[kMaxVpt];
#pragma unroll
  for (int i = 0; i < kMaxVpt; ++i) {
    const int e = first_expert + i;
    const bool real = i < p.vpt && e < p.num_experts;
    bias[i] = (p.bias != nullptr && real) ? p.bias[e] : 0.0f;
    slot_group[i] = real ? e / p.group_size : 0;
  }

  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t t = blockIdx.x * int64_t(kWarpsPerBlock) + warp; t < p.num_tokens;
       t += int64_t(gridDim.x) * kWarpsPerBlock) {
    float score[kMaxVpt];
    load_row<T, kMaxVpt>(logits + t * p.num_experts, p.vpt, first_expert, p.num_experts, p.vectorized, score);
    if constexpr (kSigmoid) {
#pragma unroll
      for (int i = 0; i < kMaxVpt; ++i) {
        score[i] = sigmoid(score[i]);
      }
    } else {
      const SoftmaxStats stats = softmax_stats<kMaxVpt>(score, p.vpt, first_expert, p.num_experts);
#pragma unroll
      for (int i = 0; i < kMaxVpt; ++i) {
        score[i] = softmax_score(score[i], stats);
      }
    }
    float sel[kMaxVpt];
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      sel[i] = nan_to_neg_inf(score[i] + bias[i]);
    }

    if (p.num_groups > 1) {
      mask_groups<kMaxVpt>(p, sel, slot_group, warp_smem, lane);
    }

    uint32_t key[kMaxVpt];
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      key[i] = (i < p.vpt && first_expert + i < p.num_experts) ? select_key(sel[i]) : 0u;
    }
    // Lane k ends up with the k-th pick.
    int my_id = 0;
    float my_weight = 0.0f;
    if (!select_from_candidates<kMaxVpt>(p.top_k, key, score, first_expert, lane, warp_candidates, my_id,
                                         my_weight)) {
      select_by_rounds<kMaxVpt>(p.top_k, key, score, first_expert, lane, my_id, my_weight);
    }
    const bool writer = lane < p.top_k;
    if (p.renormalize) {
      my_weight = my_weight / (warp_sum(writer ? my_weight : 0.0f) + kRenormEps);
    }
    if (writer) {
      p.weights[t * p.top_k + lane] = my_weight * p.scaling_factor;
      p.ids[t * p.top_k + lane] = my_id;
      if (p.counts != nullptr) {
        atomicAdd(&block_counts[my_id], 1);
      }
    }
  }
  flush_block_counts(p, block_counts, p.num_experts);
}

// ------------------------------------------------------------------------------------------------
// Two tokens per warp: sigmoid scores, E = 16 * kVpt, groups (if any) made of 2^n whole lanes.
//
// Lanes 0-15 route one token and lanes 16-31 the next (a "half" each); lane l of a half owns the
// experts [l*kVpt, (l+1)*kVpt), with kVpt exact, so no slot is padding. Each collective serves both
// tokens, halving the fixed per-token costs of the one-token kernel. Selection, per half:
//   1. group scores and kept groups as in mask_groups, masking by a per-lane flag;
//   2. tau = the K-th largest of the kept lanes' top two (lower on ties): at least K experts reach
//      tau, so none below it can be in the top K;
//   3. the ids of the experts >= tau (about K + 1 on generic data) are compacted in expert order
//      into shared memory, one per lane, and ranked against each other; rank r < K is the r-th pick.
// A half whose tau is -inf (fewer than K finite experts in the kept groups) or that has more than 16
// candidates makes the warp take K rounds of argmax over every expert (select_by_rounds per half).
// A candidate's score is recomputed from its logit (same function, same bits) rather than carried
// through the compaction, the picks carry it to the weights, and the renormalising sum adds them
// in the one-token kernel's order: weights and ids are bit-identical to router_forward_kernel's.
// ------------------------------------------------------------------------------------------------
constexpr int kHalfWarp = 16;

struct alignas(8) PairPick {  // one 8-byte shared store
  float score;                // sigmoid of the logit, without the bias
  int id;
};

// Inverse of select_key for keys of non-NaN values.
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Max of v over this lane's half, on every lane. Two full-warp redux.sync: one over a 16-lane mask
// is serialised per distinct mask (WARPSYNC.COLLECTIVE). 0 is the identity: keys are unsigned.
__device__ __forceinline__ uint32_t half_max(uint32_t v, bool upper) {
  const uint32_t lower_max = __reduce_max_sync(0xffffffffu, upper ? 0u : v);
  const uint32_t upper_max = __reduce_max_sync(0xffffffffu, upper ? v : 0u);
  return upper ? upper_max : lower_max;
}

// count += 1 if candidate j's key `other` beats candidate my_index's key `mine`: greater, or equal
// with j < my_index (lower index wins ties). One 64-bit compare, (other, my_index) > (mine, j), and
// a predicated add.
__device__ __forceinline__ void add_if_beats(int& count, uint32_t other, int j, uint32_t mine, int my_index) {
  asm("{\n\t.reg .pred p;\n\t.reg .b64 a, b;\n\tmov.b64 a, {%1, %2};\n\tmov.b64 b, {%3, %4};\n\t"
      "setp.gt.u64 p, a, b;\n\t@p add.s32 %0, %0, 1;\n\t}"
      : "+r"(count)
      : "r"(my_index), "r"(other), "r"(j), "r"(mine));
}

// The number of lanes j < `rounds` of this lane's kWidth-lane segment (read with kWidth-wide
// shuffles, lane j * lane_step) whose key beats `mine` (add_if_beats). The loop bound must be
// uniform.
template <int kWidth = kHalfWarp>
__device__ __forceinline__ int count_beating(uint32_t mine, int rounds, int lane_step, int my_index) {
  int count = 0;
  for (int j = 0; j < rounds; ++j) {
    add_if_beats(count, __shfl_sync(0xffffffffu, mine, j * lane_step, kWidth), j, mine, my_index);
  }
  return count;
}

// Bit i of the result: sel[i] >= threshold (a NaN threshold sets none). A compare and a predicated
// OR per expert (C++ gets a select as well); the count is a popc, and only the set bits are then
// visited (append_ids).
template <int kVpt>
__device__ __forceinline__ uint32_t passing_mask(const float (&sel)[kVpt], float threshold) {
  uint32_t mask = 0;
#pragma unroll
  for (int i = 0; i < kVpt; ++i) {
    asm("{\n\t.reg .pred p;\n\tsetp.ge.f32 p, %1, %2;\n\t@p or.b32 %0, %0, %3;\n\t}"
        : "+r"(mask)
        : "f"(sel[i]), "f"(threshold), "r"(1u << i));
  }
  return mask;
}

// Writes the expert ids of the mask's bits, in expert order, from dst on: one loop trip per
// candidate of the lane (about K / 16 + 1 on generic data) where a store per expert cost 4
// instructions for each of the lane's kVpt experts.
__device__ __forceinline__ void append_ids(int32_t* dst, uint32_t mask, int first_expert) {
  for (; mask != 0; mask &= mask - 1) {
    *dst++ = first_expert + __ffs(mask) - 1;
  }
}

// Whether this lane's group is kept, for kGroups groups of kWidth / kGroups lanes in each kWidth-lane
// segment (a token's lanes): every lane of a group first gets the group's top two (from the lanes'
// best and second), hence the same score; then fewer than topk_groups groups must beat it (higher
// score, or equal and lower index), the groups kept by mask_groups' rounds. Group g is read from
// its first lane.
template <int kGroups, int kWidth = kHalfWarp>
__device__ __forceinline__ bool group_kept(const ForwardParams& p, float best, float second, int token_lane) {
  constexpr int kLanes = kWidth / kGroups;
#pragma unroll
  for (int offset = 1; offset < kLanes; offset *= 2) {
    const float other_best = __shfl_xor_sync(0xffffffffu, best, offset);
    const float other_second = __shfl_xor_sync(0xffffffffu, second, offset);
    merge_top2(best, second, other_best, other_second);
  }
  const uint32_t key = select_key(p.group_top2 ? nan_to_neg_inf(best + second) : best);
  return count_beating<kWidth>(key, kGroups, kLanes, token_lane / kLanes) < p.topk_groups;
}

// The lane's kVpt logits as fp32, 0 for a half past the last token (its results are not stored).
template <typename T, int kVpt>
__device__ __forceinline__ void load_lane_logits(const T* src, bool valid, bool vectorized,
                                                 float (&v)[kVpt]) {
  constexpr int kVec = Vec16<T>::kSize;
  if constexpr (kVpt % kVec == 0) {
    if (vectorized) {
#pragma unroll
      for (int j = 0; j < kVpt / kVec; ++j) {
        Vec16<T> piece = {};
        if (valid) {
          piece = *reinterpret_cast<const Vec16<T>*>(src + j * kVec);
        }
#pragma unroll
        for (int q = 0; q < kVec; ++q) {
          v[j * kVec + q] = to_float(piece.v[q]);
        }
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kVpt; ++i) {
    v[i] = valid ? to_float(src[i]) : 0.0f;
  }
}

// The exact fallback of the multi-token kernels: K rounds of argmax over every expert of a token's
// lanes (lane mask token_mask, lane token_lane of the token's kWidth), masked experts counting as
// -inf; segment_max(v) is the max of v over the token's lanes. Returns the k-th pick's id on the
// token's lane k (0 on its lanes >= K).
template <int kVpt, typename SegmentMax>
__device__ __forceinline__ int argmax_rounds(const float (&sel)[kVpt], bool kept, int top_k, int lane,
                                             int token_lane, int first_expert, uint32_t token_mask,
                                             SegmentMax segment_max) {
  uint32_t key[kVpt];
#pragma unroll
  for (int i = 0; i < kVpt; ++i) {
    key[i] = select_key(kept ? sel[i] : -INFINITY);
  }
  int pick = 0;
  for (int k = 0; k < top_k; ++k) {
    uint32_t lane_best = 0;
    int best_slot = 0;
#pragma unroll
    for (int i = 0; i < kVpt; ++i) {
      if (key[i] > lane_best) {
        lane_best = key[i];
        best_slot = i;
      }
    }
    // Every expert's key is above 0 and E >= K: each token has a winner in every round.
    const bool top = lane_best == segment_max(lane_best);
    const int winner = __ffs(__ballot_sync(0xffffffffu, top) & token_mask) - 1;
    if (lane == winner) {
#pragma unroll
      for (int i = 0; i < kVpt; ++i) {
        key[i] = i == best_slot ? 0u : key[i];
      }
    }
    const int id = __shfl_sync(0xffffffffu, first_expert + best_slot, winner);
    if (token_lane == k) {
      pick = id;
    }
  }
  return pick;
}

// Token t's pick on its lane token_lane (< K: `writer`) of kWidth: the weight, renormalised over the
// token's lanes when asked, scaled, stored with the id, and counted.
template <int kWidth>
__device__ __forceinline__ void store_picks(const ForwardParams& p, int64_t t, int token_lane, bool writer,
                                            PairPick pick, int32_t* block_counts) {
  float weight = writer ? pick.score : 0.0f;
  if (p.renormalize) {
    float sum = weight;
#pragma unroll
    for (int offset = kWidth / 2; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    // The other lanes divide 1, not their 0: a zero dividend sends the whole warp down the IEEE
    // division's slow path (a subroutine of about 40 instructions) on every pass.
    weight = (writer ? weight : 1.0f) / (sum + kRenormEps);
  }
  if (writer) {
    p.weights[t * p.top_k + token_lane] = weight * p.scaling_factor;
    p.ids[t * p.top_k + token_lane] = pick.id;
    if (p.counts != nullptr) {
      atomicAdd(&block_counts[pick.id], 1);
    }
  }
}

// Blocks per SM the pair kernel is compiled for: 5 (40 warps, at most 48 registers, no spills) for
// kVpt <= 16. With the bias read from shared memory (16 fewer live registers), Kimi-K2 (kVpt = 24)
// went from 101 registers and 2 blocks per SM to 71 and 3 (59.7 -> 47.4 us at T = 65536);
// DeepSeek-V3 from 4 blocks to 5, within noise (42.5 -> 41.7-42.5 us): it is issue-bound.
constexpr int pair_min_blocks(int vpt) {
  return vpt <= 16 ? 5 : 1;
}

template <typename T, int kVpt>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, pair_min_blocks(kVpt))
    router_forward_pair_kernel(const ForwardParams p) {
  constexpr int kExperts = kHalfWarp * kVpt;
  __shared__ int32_t block_counts[kExperts];
  // The bias (NaN as -inf: s + bias is then never NaN, as s is in [0, 1], and equals
  // nan_to_neg_inf(s + bias) for every bias), read again for every pair rather than held in
  // kVpt registers across the loop.
  __shared__ alignas(16) float block_bias[kExperts];
  __shared__ int32_t candidates[kWarpsPerBlock][32];  // expert ids
  __shared__ PairPick picks[kWarpsPerBlock][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool upper = lane >= kHalfWarp;
  const int half_lane = lane % kHalfWarp, half_base = lane - half_lane;
  const int first_expert = half_lane * kVpt;
  const uint32_t half_mask = 0xffffu << half_base;
  int32_t* half_candidates = candidates[warp] + half_base;
  PairPick* half_picks = picks[warp] + half_base;
  for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
    block_bias[e] = p.bias != nullptr ? nan_to_neg_inf(p.bias[e]) : 0.0f;
  }
  __syncthreads();
  zero_block_counts(p, block_counts, kExperts);

  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t t0 = (blockIdx.x * int64_t(kWarpsPerBlock) + warp) * 2; t0 < p.num_tokens;
       t0 += int64_t(gridDim.x) * kWarpsPerBlock * 2) {
    const int64_t t = t0 + (upper ? 1 : 0);
    const bool valid = t < p.num_tokens;  // false for the upper half of an odd last pair
    const T* row = logits + t * kExperts;
    float sel[kVpt];
    load_lane_logits<T, kVpt>(row + first_expert, valid, p.vectorized, sel);
    float bias[kVpt];  // 16-byte shared-memory loads, as the logits' global ones
    load_lane_logits<float, kVpt>(block_bias + first_expert, true, true, bias);
#pragma unroll
    for (int i = 0; i < kVpt; ++i) {
      sel[i] = sigmoid(sel[i]) + bias[i];  // a NaN logit scores as -inf does: 0
    }
    // The lane's top two (values with multiplicity; nothing is NaN).
    float best = -INFINITY, second = -INFINITY;
#pragma unroll
    for (int i = 0; i < kVpt; ++i) {
      second = fmaxf(second, fminf(best, sel[i]));
      best = fmaxf(best, sel[i]);
    }

    // Groups: every lane of a group ends up with the group's top two, hence the same score.
    bool kept = true;
    switch (p.num_groups) {  // a compile-time group count unrolls group_kept's loops
      case 2:
        kept = group_kept<2>(p, best, second, half_lane);
        break;
      case 4:
        kept = group_kept<4>(p, best, second, half_lane);
        break;
      case 8:
        kept = group_kept<8>(p, best, second, half_lane);
        break;
      case 16:
        kept = group_kept<16>(p, best, second, half_lane);
        break;
      default:  // 1: no groups (the launcher admits only divisors of 16)
        break;
    }

    // tau: K rounds popping the largest head of the half; masked lanes offer none (0). Every lane
    // holding the maximum pops, so each round pops at least one head and all popped heads are >=
    // the last round's maximum: at least K heads (distinct experts) are >= tau. Without ties that
    // is the K-th largest head; ties only lower tau. tau is 0 when the kept lanes run out of heads.
    uint32_t head = kept ? select_key(best) : 0u, next_head = kept ? select_key(second) : 0u;
    uint32_t tau = 0;
    for (int k = 0; k < p.top_k; ++k) {
      tau = half_max(head, upper);
      if (head == tau) {
        head = next_head;
        next_head = 0;
      }
    }
    // Above the key of -inf, tau is a real value and the masked experts (-inf) are below it. A NaN
    // threshold makes a lane offer no candidate (masked lanes, the empty half, the fallback).
    const bool usable = tau > select_key(-INFINITY);
    const float threshold = (valid && kept && usable) ? key_value(tau) : __uint_as_float(0x7fffffffu);
    const uint32_t passing = passing_mask<kVpt>(sel, threshold);
    const int count = __popc(passing);
    int position = count;  // inclusive prefix sum over the half's lanes, then exclusive
#pragma unroll
    for (int offset = 1; offset < kHalfWarp; offset *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, position, offset, kHalfWarp);
      position += half_lane >= offset ? other : 0;
    }
    const int num_candidates = __shfl_sync(0xffffffffu, position, kHalfWarp - 1, kHalfWarp);
    position -= count;
    const bool fallback = valid && (!usable || num_candidates > kHalfWarp);

    const bool writer = valid && half_lane < p.top_k;
    PairPick my_pick = {0.0f, 0};  // lane k < K of the half: the k-th pick
    if (!__any_sync(0xffffffffu, fallback)) {
      append_ids(half_candidates + position, passing, first_expert);
      __syncwarp();
      // Candidate j's score is recomputed from its logit (an L1 hit: the row was just read) and
      // bias, by the same instructions, hence the same bits as sel[] when it passed the threshold.
      // Lanes past the half's candidates rank key 0, below every candidate (> the key of -inf).
      const bool candidate = half_lane < num_candidates;
      PairPick mine = {0.0f, 0};
      uint32_t key = 0;
      if (candidate) {
        mine.id = half_candidates[half_lane];
        mine.score = sigmoid(to_float(row[mine.id]));
        key = select_key(mine.score + block_bias[mine.id]);
      }
      // Rank: candidates above, plus equal ones earlier in expert order (lower index wins ties).
      const int rounds = __reduce_max_sync(0xffffffffu, num_candidates);  // both halves at once
      const int rank = count_beating(key, rounds, 1, half_lane);
      if (candidate && rank < p.top_k) {
        half_picks[rank] = mine;
      }
      __syncwarp();
      if (writer) {
        my_pick = half_picks[half_lane];
      }
    } else {
      my_pick.id = argmax_rounds<kVpt>(sel, kept, p.top_k, lane, half_lane, first_expert, half_mask,
                                       [upper](uint32_t v) { return half_max(v, upper); });
      if (writer) {
        my_pick.score = sigmoid(to_float(row[my_pick.id]));
      }
    }

    // The renormalising sum runs over the half as warp_sum does over lanes 0-15 in the one-token
    // kernel (lanes 16-31 add +0 there).
    store_picks<kHalfWarp>(p, t, half_lane, writer, my_pick, block_counts);
  }
  flush_block_counts(p, block_counts, kExperts);
}

// ------------------------------------------------------------------------------------------------
// Four tokens per warp: sigmoid scores, E = 8 * kQuadVpt = 256 (DeepSeek-V3), top_k <= 8, groups
// (if any) made of whole lanes.
//
// Lanes 8q..8q+7 route token t0 + q (a "quarter"); lane l of a quarter owns the experts
// [l*32, (l+1)*32). Every warp collective (group ranks, threshold rounds, prefix sum, candidate
// ranks, renormalising sum) serves four tokens instead of the pair kernel's two; the per-expert work
// is the same. Selection per quarter as in the pair kernel, with these differences:
//   - a lane keeps the top two of each half of its experts: the threshold rounds draw from 32 heads
//     per token, as the pair kernel's 16 lanes do (on random DeepSeek-V3 rows about K + 0.4
//     candidates, 1e-4 of tokens over 16; the top two of 32 experts would give about K + 3);
//   - the rounds pop from each lane's four heads sorted once, on floats (no key per head; NaN is
//     an empty head, which fmaxf skips), and take the quarter's maximum by three xor shuffles;
//   - up to 16 candidates, two per lane (candidates j and j + 8 on lane j), ranked in one pass;
//   - the picks of a quarter sit on its 8 lanes, hence top_k <= 8.
// Results are bit-identical to the pair kernel's: the same sel values and selection rule, each
// candidate's score recomputed by the same instructions, and the renormalising sum over 8 lanes
// equal to the pair kernel's over 16 (its lanes 8-15 hold +0 when top_k <= 8, and x + +0 = x for
// the non-negative scores).
// ------------------------------------------------------------------------------------------------
constexpr int kQuarterWarp = 8;
constexpr int kQuadVpt = 32;
constexpr int kQuadMaxCandidates = 2 * kQuarterWarp;
// Words per quarter in the candidate buffer: 16 ids and 8 of padding, so that the four quarters'
// candidate j (read at once by lane j % 8 of each) lie in four different banks.
constexpr int kQuadCandidateStride = kQuadMaxCandidates + 8;
// 3 blocks per SM (24 warps) allow 80 registers; the kernel takes 72. With 4 it compiles to 64
// registers without spills but 28 more instructions (not measured on the GPU).
constexpr int kQuadMinBlocks = 3;

// Where expert e's bias sits in the quad kernel's shared memory: a lane's 32 biases are 8 pieces of
// 16 bytes, and piece j of lane l is stored at piece j ^ l of the lane's 128 bytes. The 8 lanes of
// a quarter read their piece j from 8 different groups of 4 banks; unswizzled, they would all read
// the same 4 banks (an 8-way conflict on each of the 8 vector loads per token).
__device__ __forceinline__ int quad_bias_slot(int e) {
  static_assert(kQuadVpt == 32 && kQuarterWarp == 8);
  return e ^ (((e >> 5) & 7) << 2);  // the lane (e / 32 mod 8) times 4 floats
}

// Max over this lane's quarter, on every lane of it (NaN is skipped: the max of nothing is NaN).
__device__ __forceinline__ float quarter_max(float v) {
#pragma unroll
  for (int offset = kQuarterWarp / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ uint32_t quarter_max(uint32_t v) {
#pragma unroll
  for (int offset = kQuarterWarp / 2; offset > 0; offset /= 2) {
    v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Ranks of the quarter's candidates qlane (key_a) and qlane + 8 (key_b) among its `rounds` (uniform
// over the warp, at most 16) candidates, as count_beating. Candidate j < 8 precedes candidate
// qlane + 8 and j >= 8 follows qlane, so one of each candidate's two compares needs no index.
// With 8 or fewer candidates in every quarter, key_b is no candidate and is skipped.
__device__ __forceinline__ void quad_ranks(uint32_t key_a, uint32_t key_b, int rounds, int qlane, int& rank_a,
                                           int& rank_b) {
  rank_a = 0;
  rank_b = 0;
  if (rounds <= kQuarterWarp) {
#pragma unroll
    for (int j = 0; j < kQuarterWarp; ++j) {
      if (j >= rounds) {
        break;
      }
      add_if_beats(rank_a, __shfl_sync(0xffffffffu, key_a, j, kQuarterWarp), j, key_a, qlane);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kQuarterWarp; ++j) {
    const uint32_t other = __shfl_sync(0xffffffffu, key_a, j, kQuarterWarp);
    add_if_beats(rank_a, other, j, key_a, qlane);
    rank_b += other >= key_b;
  }
#pragma unroll
  for (int j = kQuarterWarp; j < kQuadMaxCandidates; ++j) {
    if (j >= rounds) {
      break;
    }
    const uint32_t other = __shfl_sync(0xffffffffu, key_b, j - kQuarterWarp, kQuarterWarp);
    rank_a += other > key_a;
    add_if_beats(rank_b, other, j, key_b, qlane + kQuarterWarp);
  }
}

// Candidate `id` of a quarter: its unbiased score and its selection key, by the instructions that
// computed sel[] (sigmoid, then + bias), hence the same bits.
template <typename T>
__device__ __forceinline__ uint32_t quad_candidate(const T* row, const float* block_bias, int id,
                                                   PairPick& pick) {
  pick.id = id;
  pick.score = sigmoid(to_float(row[id]));
  return select_key(pick.score + block_bias[quad_bias_slot(id)]);
}

template <typename T, int kVpt>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kQuadMinBlocks)
    router_forward_quad_kernel(const ForwardParams p) {
  static_assert(kVpt == kQuadVpt,
                "the bias swizzle and the 32-bit candidate mask assume 32 experts per lane");
  constexpr int kExperts = kQuarterWarp * kVpt;
  constexpr int kHalfVpt = kVpt / 2;
  __shared__ int32_t block_counts[kExperts];
  __shared__ alignas(16) float block_bias[kExperts];  // NaN as -inf (see the pair kernel), swizzled
  __shared__ int32_t candidates[kWarpsPerBlock][4 * kQuadCandidateStride];  // expert ids
  __shared__ PairPick picks[kWarpsPerBlock][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int quarter = lane / kQuarterWarp, qlane = lane % kQuarterWarp, quarter_base = quarter * kQuarterWarp;
  const int first_expert = qlane * kVpt;
  const uint32_t quarter_mask = 0xffu << quarter_base;
  int32_t* quarter_candidates = candidates[warp] + quarter * kQuadCandidateStride;
  PairPick* quarter_picks = picks[warp] + quarter_base;
  for (int e = threadIdx.x; e < kExperts; e += blockDim.x) {
    block_bias[quad_bias_slot(e)] = p.bias != nullptr ? nan_to_neg_inf(p.bias[e]) : 0.0f;
  }
  __syncthreads();
  zero_block_counts(p, block_counts, kExperts);

  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t t0 = (blockIdx.x * int64_t(kWarpsPerBlock) + warp) * 4; t0 < p.num_tokens;
       t0 += int64_t(gridDim.x) * kWarpsPerBlock * 4) {
    const int64_t t = t0 + quarter;
    const bool valid = t < p.num_tokens;  // false for the quarters past the last token
    // Those quarters route the last token again (nothing of theirs is stored): loads without
    // predicates, and no zeroing of the 32 registers.
    const T* row = logits + (valid ? t : p.num_tokens - 1) * kExperts;
    float sel[kVpt];
    load_lane_logits<T, kVpt>(row + first_expert, true, p.vectorized, sel);
#pragma unroll
    for (int j = 0; j < kVpt / 4; ++j) {
      const float4 bias = *reinterpret_cast<const float4*>(block_bias + first_expert + ((j ^ qlane) * 4));
      sel[4 * j + 0] = sigmoid(sel[4 * j + 0]) + bias.x;  // a NaN logit scores as -inf does: 0
      sel[4 * j + 1] = sigmoid(sel[4 * j + 1]) + bias.y;
      sel[4 * j + 2] = sigmoid(sel[4 * j + 2]) + bias.z;
      sel[4 * j + 3] = sigmoid(sel[4 * j + 3]) + bias.w;
    }
    // The top two of each half of the lane's experts (values with multiplicity; nothing is NaN).
    float lo_best = -INFINITY, lo_second = -INFINITY, hi_best = -INFINITY, hi_second = -INFINITY;
#pragma unroll
    for (int i = 0; i < kHalfVpt; ++i) {
      lo_second = fmaxf(lo_second, fminf(lo_best, sel[i]));
      lo_best = fmaxf(lo_best, sel[i]);
      hi_second = fmaxf(hi_second, fminf(hi_best, sel[kHalfVpt + i]));
      hi_best = fmaxf(hi_best, sel[kHalfVpt + i]);
    }

    // Groups: every lane of a group ends up with the group's top two, hence the same score.
    bool kept = true;
    {
      float best = lo_best, second = lo_second;
      merge_top2(best, second, hi_best, hi_second);
      switch (p.num_groups) {  // a compile-time group count unrolls group_kept's loops
        case 2:
          kept = group_kept<2, kQuarterWarp>(p, best, second, qlane);
          break;
        case 4:
          kept = group_kept<4, kQuarterWarp>(p, best, second, qlane);
          break;
        case 8:
          kept = group_kept<8, kQuarterWarp>(p, best, second, qlane);
          break;
        default:  // 1: no groups (the launcher admits only divisors of 8)
          break;
      }
    }

    // tau, as in the pair kernel: K rounds popping the quarter's largest head, every lane holding
    // it popping its own. The lane's heads in descending order, merged from its two sorted pairs; a
    // masked lane offers none (NaN first), and a lane that has popped all four offers NaN. tau is
    // NaN when the kept lanes run out of heads.
    const float mid_a = fminf(lo_best, hi_best), mid_b = fmaxf(lo_second, hi_second);
    float head0 = kept ? fmaxf(lo_best, hi_best) : NAN, head1 = fmaxf(mid_a, mid_b),
          head2 = fminf(mid_a, mid_b), head3 = fminf(lo_second, hi_second);
    float tau = NAN;
    for (int k = 0; k < p.top_k; ++k) {
      tau = quarter_max(head0);
      if (head0 == tau) {
        head0 = head1;
        head1 = head2;
        head2 = head3;
        head3 = NAN;
      }
    }
    // Above -inf, tau is a value that at least K experts of kept lanes reach and the masked experts
    // (-inf) do not. A NaN threshold makes a lane offer no candidate (masked lanes, the quarters
    // past the last token, the fallback).
    const bool usable = tau > -INFINITY;  // false for NaN
    const float threshold = (valid && kept && usable) ? tau : __uint_as_float(0x7fffffffu);
    const uint32_t passing = passing_mask<kVpt>(sel, threshold);
    const int count = __popc(passing);
    int position = count;  // inclusive prefix sum over the quarter's lanes, then exclusive
#pragma unroll
    for (int offset = 1; offset < kQuarterWarp; offset *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, position, offset, kQuarterWarp);
      position += qlane >= offset ? other : 0;
    }
    const int num_candidates = __shfl_sync(0xffffffffu, position, kQuarterWarp - 1, kQuarterWarp);
    position -= count;
    const bool fallback = valid && (!usable || num_candidates > kQuadMaxCandidates);

    const bool writer = valid && qlane < p.top_k;
    PairPick my_pick = {0.0f, 0};  // lane k < K of the quarter: the k-th pick
    if (!__any_sync(0xffffffffu, fallback)) {
      append_ids(quarter_candidates + position, passing, first_expert);
      __syncwarp();
      // Candidates qlane and qlane + 8; lanes past the quarter's candidates rank key 0, below every
      // candidate (> the key of -inf).
      const bool candidate_a = qlane < num_candidates, candidate_b = qlane + kQuarterWarp < num_candidates;
      PairPick pick_a = {0.0f, 0}, pick_b = {0.0f, 0};
      uint32_t key_a = 0, key_b = 0;
      if (candidate_a) {
        key_a = quad_candidate(row, block_bias, quarter_candidates[qlane], pick_a);
      }
      if (candidate_b) {
        key_b = quad_candidate(row, block_bias, quarter_candidates[qlane + kQuarterWarp], pick_b);
      }
      int rank_a, rank_b;
      quad_ranks(key_a, key_b, __reduce_max_sync(0xffffffffu, num_candidates), qlane, rank_a, rank_b);
      if (candidate_a && rank_a < p.top_k) {
        quarter_picks[rank_a] = pick_a;
      }
      if (candidate_b && rank_b < p.top_k) {
        quarter_picks[rank_b] = pick_b;
      }
      __syncwarp();
      if (writer) {
        my_pick = quarter_picks[qlane];
      }
    } else {
      my_pick.id = argmax_rounds<kVpt>(sel, kept, p.top_k, lane, qlane, first_expert, quarter_mask,
                                       [](uint32_t v) { return quarter_max(v); });
      if (writer) {
        my_pick.score = sigmoid(to_float(row[my_pick.id]));
      }
    }

    store_picks<kQuarterWarp>(p, t, qlane, writer, my_pick, block_counts);
  }
  flush_block_counts(p, block_counts, kExperts);
}

// d weights / d logits. With p_k the picked scores, D = sum_k p_k + eps:
//   g_p_k = s * (g_w_k / D - sum_j g_w_j p_j / D^2)   (renormalised)   or   s * g_w_k
//   sigmoid: g_l[id_k] = g_p_k p_k (1 - p_k), 0 elsewhere
//   softmax: g_l_i = s_i (g_i - c), c = sum_k g_p_k p_k, g_i = g_p_k at i = id_k else 0
template <typename T, int kMaxVpt, bool kSigmoid>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_backward_kernel(const BackwardParams p) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int first_expert = lane * p.vpt;
  const T* logits = static_cast<const T*>(p.logits);
  T* grad_logits = static_cast<T*>(p.grad_logits);
  for (int64_t t = blockIdx.x * int64_t(kWarpsPerBlock) + warp; t < p.num_tokens;
       t += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T* row = logits + t * p.num_experts;
    T* grad_row = grad_logits + t * p.num_experts;
    const int loaded_id = lane < p.top_k ? p.ids[t * p.top_k + lane] : -1;
    const bool picker = loaded_id >= 0 && loaded_id < p.num_experts;  // never index outside the row
    const int id = picker ? loaded_id : 0;
    const float grad_w = picker ? p.grad_weights[t * p.top_k + lane] : 0.0f;

    // p_k on lane k, recomputed exactly as the forward computed it.
    const float picked_logit = picker ? nan_to_neg_inf(to_float(row[id])) : 0.0f;
    float picked = 0.0f;
    float score[kMaxVpt];
    if constexpr (kSigmoid) {
      picked = picker ? sigmoid(picked_logit) : 0.0f;
    } else {
      load_row<T, kMaxVpt>(row, p.vpt, first_expert, p.num_experts, p.vectorized, score);
      const SoftmaxStats stats = softmax_stats<kMaxVpt>(score, p.vpt, first_expert, p.num_experts);
#pragma unroll
      for (int i = 0; i < kMaxVpt; ++i) {
        score[i] = softmax_score(score[i], stats);
      }
      picked = picker ? softmax_score(picked_logit, stats) : 0.0f;
    }
    float grad_p = p.scaling_factor * grad_w;
    if (p.renormalize) {
      const float denom = warp_sum(picked) + kRenormEps;
      const float dot = warp_sum(grad_w * picked);
      grad_p = p.scaling_factor * (grad_w / denom - dot / (denom * denom));
    }
    // The dense part of the row (0 for sigmoid, -s_i c for softmax), then the picked entries.
    float dense[kMaxVpt];
    float c = 0.0f;
    if constexpr (!kSigmoid) {
      c = warp_sum(grad_p * picked);
    }
#pragma unroll
    for (int i = 0; i < kMaxVpt; ++i) {
      dense[i] = kSigmoid ? 0.0f : -score[i] * c;
    }
    store_row<T, kMaxVpt>(grad_row, p.vpt, first_expert, p.num_experts, p.vectorized, dense);
    __syncwarp();  // orders the dense stores before the picked entries
    if (picker) {
      const float g = kSigmoid ? grad_p * picked * (1.0f - picked) : picked * (grad_p - c);
      grad_row[id] = from_float<T>(g);
    }
  }
}

}  // namespace router
}  // namespace moe_kernels
