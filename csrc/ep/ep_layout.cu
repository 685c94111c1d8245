// Launchers of the expert-parallel source-side layout (csrc/include/moe_kernels/ep.cuh): each token's
// destination ranks, and the meta and counts that travel with the send block. Argument checks,
// device guard, current stream; sizes from host-known T, K, E, W only (no host sync).
#include <limits>

#include "common/device_error.h"
#include "moe_kernels/ep.cuh"
#include "permute/copy_rows.h"
#include "torch_utils.h"

namespace moe_kernels {
namespace {

void check_int_tensor(const at::Tensor& t, const at::Tensor& like, int64_t dim, const char* op,
                      const char* name, bool allow_int64 = false) {
  MK_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got device ", t.device());
  MK_CHECK(t.device() == like.device(), op, name, " must be on ", like.device(), ", got ", t.device());
  MK_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got shape ", shape_str(t));
  MK_CHECK(t.scalar_type() == at::kInt || (allow_int64 && t.scalar_type() == at::kLong), op, name,
           allow_int64 ? " must be int32 or int64, got " : " must be int32, got ",
           dtype_name(t.scalar_type()));
}

void check_expert_ids(const at::Tensor& ids, const char* op) {
  MK_CHECK_CUDA_TENSOR(ids, op, "expert_ids");
  MK_CHECK_DIM(ids, 2, op, "expert_ids", "[tokens, top_k]");
  MK_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
           "expert_ids must be int32 or int64, got ", dtype_name(ids.scalar_type()));
  MK_CHECK(ids.size(1) >= 1 && ids.size(1) <= ep::kMaxTopK, op, "top_k (expert_ids.shape[1]) must be in [1, ",
           ep::kMaxTopK, "], got ", ids.size(1));
}

template <typename F>
void dispatch_ids(const at::Tensor& ids, F&& f) {
  if (ids.scalar_type() == at::kLong) {
    f(static_cast<const int64_t*>(ids.data_ptr()));
  } else {
    f(static_cast<const int32_t*>(ids.data_ptr()));
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + ep::kThreads - 1) / ep::kThreads);
}

unsigned blocks_for_tokens(int64_t tokens) {  // a warp per token
  return static_cast<unsigned>((tokens + ep::kTokensPerBlock - 1) / ep::kTokensPerBlock);
}

at::Tensor ep_token_ranks(const at::Tensor& ids_in, const at::Tensor& expert_rank, int64_t num_ranks) {
  constexpr const char* op = "ep_token_ranks";
  check_expert_ids(ids_in, op);
  check_int_tensor(expert_rank, ids_in, 1, op, "expert_rank");
  MK_CHECK(num_ranks >= 1 && num_ranks <= ep::kMaxRanks, op, "num_ranks must be in [1, ", ep::kMaxRanks,
           "], got ", num_ranks);
  check_hopper(ids_in, op);
  const c10::cuda::CUDAGuard guard(ids_in.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t tokens = ids.size(0), top_k = ids.size(1);
  at::Tensor rank_ids = at::empty({tokens, top_k}, ids.options().dtype(at::kInt));
  if (tokens == 0) {
    return rank_ids;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_ids(ids, [&](auto* id_ptr) {
    using IdT = std::remove_const_t<std::remove_pointer_t<decltype(id_ptr)>>;
    ep::token_ranks_kernel<IdT><<<blocks_for_tokens(tokens), ep::kThreads, 0, stream>>>(
        id_ptr, tokens, static_cast<int>(top_k), static_cast<int>(expert_rank.size(0)),
        expert_rank.data_ptr<int>(), rank_ids.data_ptr<int>(), device_error_flag());
  });
  MK_CUDA_CHECK(cudaGetLastError(), op);
  return rank_ids;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_pack_meta(
    const at::Tensor& ids_in, const std::optional<at::Tensor>& weights_in, const at::Tensor& expert_rank,
    const at::Tensor& expert_local, const at::Tensor& expert_row_map, const at::Tensor& expert_offsets,
    const at::Tensor& rank_ids, const at::Tensor& send_row_map, const at::Tensor& rank_offsets,
    const at::Tensor& rank_experts, int64_t capacity, int64_t num_send_rows) {
  constexpr const char* op = "ep_pack_meta";
  check_expert_ids(ids_in, op);
  const int64_t tokens = ids_in.size(0), top_k = ids_in.size(1);
  const int64_t num_experts = expert_rank.size(0);
  check_int_tensor(expert_rank, ids_in, 1, op, "expert_rank");
  check_int_tensor(expert_local, ids_in, 1, op, "expert_local");
  check_int_tensor(expert_row_map, ids_in, 2, op, "expert_row_map");
  check_int_tensor(expert_offsets, ids_in, 1, op, "expert_offsets");
  check_int_tensor(rank_ids, ids_in, 2, op, "rank_ids");
  check_int_tensor(send_row_map, ids_in, 2, op, "send_row_map");
  check_int_tensor(rank_offsets, ids_in, 1, op, "rank_offsets");
  check_int_tensor(rank_experts, ids_in, 2, op, "rank_experts");
  const int64_t num_ranks = rank_experts.size(0), max_local = rank_experts.size(1);
  MK_CHECK(expert_local.size(0) == num_experts && expert_offsets.size(0) == num_experts + 1, op,
           "expert_local [E] and expert_offsets [E + 1] must match expert_rank's E=", num_experts, ", got ",
           shape_str(expert_local), " and ", shape_str(expert_offsets));
  MK_CHECK(expert_row_map.sizes() == ids_in.sizes() && rank_ids.sizes() == ids_in.sizes() &&
               send_row_map.sizes() == ids_in.sizes(),
           op, "expert_row_map, rank_ids and send_row_map must be [tokens, top_k] = ", shape_str(ids_in));
  MK_CHECK(rank_offsets.size(0) == num_ranks + 1, op, "rank_offsets must be [W + 1] = [", num_ranks + 1,
           "], got ", shape_str(rank_offsets));
  MK_CHECK(capacity >= 0 && (capacity == 0 || capacity * num_ranks <= num_send_rows), op,
           "capacity must be 0 (packed) or fit num_ranks * capacity rows in num_send_rows=", num_send_rows,
           ", got ", capacity);
  MK_CHECK(num_send_rows >= 0 && num_send_rows <= std::numeric_limits<int32_t>::max() / top_k, op,
           "num_send_rows must be in [0, 2^31 / top_k), got ", num_send_rows);
  if (weights_in.has_value()) {
    const at::Tensor& w = *weights_in;
    MK_CHECK(w.device() == ids_in.device() && w.sizes() == ids_in.sizes(), op,
             "weights must be [tokens, top_k] = ", shape_str(ids_in), " on ", ids_in.device(), ", got ",
             shape_str(w), " on ", w.device());
  }
  check_hopper(ids_in, op);
  const c10::cuda::CUDAGuard guard(ids_in.device());
  const auto options = ids_in.options().dtype(at::kInt);
  at::Tensor meta = at::empty({num_send_rows, ep::kMetaFields, top_k}, options);
  at::Tensor pair_slot = at::empty({tokens, top_k}, options);
  at::Tensor send_counts = at::empty({num_ranks, 1 + max_local}, options);
  at::Tensor send_rows = at::empty({tokens, top_k}, options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t count_cells = num_ranks * (1 + max_local);
  const at::Tensor experts_of_rank = rank_experts.contiguous();
  ep::send_counts_kernel<<<blocks_for(count_cells), ep::kThreads, 0, stream>>>(
      static_cast<int>(num_ranks), static_cast<int>(max_local), rank_offsets.data_ptr<int>(),
      expert_offsets.data_ptr<int>(), experts_of_rank.data_ptr<int>(), send_counts.data_ptr<int>());
  MK_CUDA_CHECK(cudaGetLastError(), op);
  if (tokens == 0) {
    return {meta, pair_slot, send_counts, send_rows};
  }
  ep::PackMetaParams p{};
  p.num_tokens = tokens;
  p.top_k = static_cast<int>(top_k);
  p.num_experts = static_cast<int>(num_experts);
  p.expert_rank = expert_rank.data_ptr<int>();
  p.expert_local = expert_local.data_ptr<int>();
  const at::Tensor expert_row = expert_row_map.contiguous(), ranks = rank_ids.contiguous();
  const at::Tensor send_row = send_row_map.contiguous();
  p.expert_row = expert_row.data_ptr<int>();
  p.expert_offsets = expert_offsets.data_ptr<int>();
  p.rank_ids = ranks.data_ptr<int>();
  p.send_row = send_row.data_ptr<int>();
  p.rank_offsets = rank_offsets.data_ptr<int>();
  p.capacity = static_cast<int>(capacity);
  p.num_send_rows = static_cast<int>(num_send_rows);
  p.meta = meta.data_ptr<int>();
  p.pair_slot = pair_slot.data_ptr<int>();
  p.send_row_out = send_rows.data_ptr<int>();
  p.error_flag = device_error_flag();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor weights = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  dispatch_ids(ids, [&](auto* id_ptr) {
    using IdT = std::remove_const_t<std::remove_pointer_t<decltype(id_ptr)>>;
    if (!weights.defined()) {
      ep::pack_meta_kernel<IdT, float>
          <<<blocks_for_tokens(tokens), ep::kThreads, 0, stream>>>(p, id_ptr, nullptr);
      return;
    }
    dispatch_float_type(weights.scalar_type(), op, "weights", [&](auto* weight_tag) {
      using W = std::remove_pointer_t<decltype(weight_tag)>;
      ep::pack_meta_kernel<IdT, W><<<blocks_for_tokens(tokens), ep::kThreads, 0, stream>>>(
          p, id_ptr, static_cast<const W*>(weights.data_ptr()));
    });
  });
  MK_CUDA_CHECK(cudaGetLastError(), op);
  return {meta, pair_slot, send_counts, send_rows};
}

// The rows of the send block: permute's copy (or fused FP8 quantisation) with a given row map, so
// that each token is read once and written once per destination rank.
std::tuple<at::Tensor, at::Tensor> ep_pack_rows(const at::Tensor& x_in,
                                                const std::optional<at::Tensor>& x_scales_in,
                                                const at::Tensor& row_map_in, bool quantize, bool pow2_scale,
                                                int64_t num_out_rows) {
  constexpr const char* op = "ep_pack_rows";
  MK_CHECK_CUDA_TENSOR(x_in, op, "x");
  MK_CHECK_DIM(x_in, 2, op, "x", "[tokens, hidden]");
  check_int_tensor(row_map_in, x_in, 2, op, "row_map");
  const auto dtype = x_in.scalar_type();
  const int64_t tokens = x_in.size(0), hidden = x_in.size(1);
  MK_CHECK(row_map_in.size(0) == tokens && row_map_in.size(1) >= 1 && row_map_in.size(1) <= kPermuteMaxTopK,
           op, "row_map must be [tokens, k] with tokens = ", tokens, " and k in [1, ", kPermuteMaxTopK,
           "], got ", shape_str(row_map_in));
  MK_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == kFp8, op,
           "x must be bfloat16 or float16 or float32 or float8_e4m3fn, got ", dtype_name(dtype));
  const bool fp8_in = dtype == kFp8, fp8_out = fp8_in || quantize;
  MK_CHECK(!(fp8_in && quantize), op, "x is already FP8: quantize must be False");
  MK_CHECK(x_scales_in.has_value() == fp8_in, op, "x_scales must be given exactly when x is float8_e4m3fn");
  MK_CHECK(!fp8_out || hidden % kQuantBlock == 0, op, "x's channels must be a multiple of 128, got ", hidden);
  MK_CHECK(hidden * x_in.element_size() % 16 == 0, op,
           "x's rows must be a multiple of 16 bytes, got hidden=", hidden);
  MK_CHECK(num_out_rows >= 0 && num_out_rows <= std::numeric_limits<int32_t>::max(), op,
           "num_out_rows must be in [0, 2^31), got ", num_out_rows);
  check_hopper(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto options = x_in.options();
  at::Tensor out = at::empty({num_out_rows, hidden}, options.dtype(fp8_out ? kFp8 : dtype));
  at::Tensor out_scales = fp8_out ? at::empty({num_out_rows, hidden / kQuantBlock}, options.dtype(at::kFloat))
                                  : at::empty({0}, options.dtype(at::kFloat));
  if (tokens == 0 || num_out_rows == 0 || hidden == 0) {
    return {out, out_scales};
  }
  const at::Tensor row_map = row_map_in.contiguous();
  const PermuteCopyParams copy =
      copy_rows_params(row_map.data_ptr<int>(), row_map.size(1), tokens, out, out_scales);
  launch_copy_rows(copy, x_in, x_scales_in, quantize, pow2_scale, op);
  return {out, out_scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("ep_token_ranks", &ep_token_ranks);
  m.impl("ep_pack_meta", &ep_pack_meta);
  m.impl("ep_pack_rows", &ep_pack_rows);
}

}  // namespace moe_kernels
