// The one schema block of moe_kernels: every op, grouped by area. CUDA kernels register their
// implementations next to their launchers (csrc/<family>/*.cu); CPU implementations (the pure-PyTorch
// references) and fake kernels are registered from Python (moe_kernels/ops/).
#include <Python.h>
#include <nccl.h>
#include <torch/library.h>

#include "common/device_error.h"
#include "ep/nccl_comm.h"

namespace moe_kernels {

// Version of the NCCL this extension links (torch's own), e.g. 22809 for 2.28.9.
int64_t nccl_version() {
  int version = 0;
  const ncclResult_t status = ncclGetVersion(&version);
  TORCH_CHECK(status == ncclSuccess, "nccl_version: ncclGetVersion failed: ", ncclGetErrorString(status));
  return version;
}

}  // namespace moe_kernels

// Fake (meta) kernels and CPU implementations are registered by `import moe_kernels` (moe_kernels/ops/).
TORCH_LIBRARY(moe_kernels, m) {
  // FP8 e4m3 quantisation: 1x128 activation groups, 128x128 weight blocks (csrc/quant).
  m.def("quantize_fp8(Tensor x, bool pow2_scale=False) -> (Tensor, Tensor)");
  m.def("quantize_fp8_weight(Tensor w, bool pow2_scale=False) -> (Tensor, Tensor)");
  // The same and the transposed e4m3 copy [.., K, N] in one pass (the FP8 dgrad's weight operand).
  m.def("quantize_fp8_weight_transposed(Tensor w, bool pow2_scale=False) -> (Tensor, Tensor, Tensor)");
  // Per expert, transposed, one scale per channel and 128 rows: the FP8 wgrad's operands
  // (q [capacity * C], scales [capacity / 128 * C], padded_offsets [E + 1]; csrc/quant).
  m.def(
      "quantize_fp8_transposed(Tensor x, Tensor? x_scales, Tensor expert_offsets, bool pow2_scale) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("dequantize_fp8(Tensor q, Tensor scales, ScalarType out_dtype) -> Tensor");

  // Router: fused scores + expert bias + group-limited top-K + histogram; balance losses; bias
  // update for auxiliary-loss-free balancing (csrc/router).
  m.def(
      "router(Tensor logits, int top_k, Tensor? bias, str score_func, int num_groups, int topk_groups, "
      "str group_score, bool renormalize, float scaling_factor, bool return_counts) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "router_backward(Tensor grad_weights, Tensor logits, Tensor ids, str score_func, bool renormalize, "
      "float scaling_factor) -> Tensor");
  m.def(
      "balance_loss(Tensor logits, Tensor expert_ids, Tensor? seq_offsets, str score_func, int num_devices, "
      "float alpha) -> (Tensor, Tensor)");
  m.def(
      "balance_loss_backward(Tensor grad_loss, Tensor logits, Tensor expert_ids, Tensor coeffs, "
      "Tensor? seq_offsets, str score_func) -> Tensor");
  m.def("update_expert_bias(Tensor(a!) bias, Tensor counts, float rate) -> ()");

  // Expert GEMMs: grouped GEMM over permuted rows (CUTLASS, FP8 blockwise or BF16) and the fused
  // SwiGLU activation between the two GEMMs of the expert MLP (csrc/gemm).
  m.def(
      "grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, Tensor? a_scales, Tensor? b_scales, "
      "str config=\"auto\") -> Tensor");
  m.def(
      "grouped_gemm_out(Tensor a, Tensor b, Tensor expert_offsets, Tensor? a_scales, Tensor? b_scales, "
      "Tensor(a!) out, str config=\"auto\") -> ()");
  m.def("silu_mul(Tensor h, Tensor? expert_offsets, bool quantize, bool pow2_scale) -> (Tensor, Tensor)");
  // Backward of the expert GEMMs and of SwiGLU (training): dgrad (BF16; FP8 runs the forward kernel on
  // the transposed weight), wgrad grouped along the reduction (BF16, and FP8 on
  // quantize_fp8_transposed's operands), and (grad_h, act, grad_h e4m3, its scales).
  m.def("grouped_gemm_dgrad(Tensor grad_out, Tensor b, Tensor expert_offsets) -> Tensor");
  m.def(
      "grouped_gemm_wgrad(Tensor grad_out, Tensor a, Tensor expert_offsets, ScalarType out_dtype, "
      "str config=\"auto\") -> Tensor");
  m.def(
      "grouped_gemm_wgrad_fp8(Tensor grad_t, Tensor grad_t_scales, Tensor act_t, Tensor act_t_scales, "
      "Tensor padded_offsets, int n, int k, ScalarType out_dtype, str config=\"auto\") -> Tensor");
  m.def(
      "silu_mul_backward(Tensor grad_act, Tensor h, Tensor? expert_offsets, bool return_act, bool quantize, "
      "bool pow2_scale) -> (Tensor, Tensor, Tensor, Tensor)");

  // Permute / unpermute (csrc/permute): rows grouped by local expert, padded to `align`; optional
  // fused FP8 1x128 quantisation; weighted combine. Returns of permute: (out [R, H], out_scales
  // [R, H/128] fp32 or [0] when not FP8, expert_offsets int32 [E_local + 1], row_map int32 [T, K]).
  m.def(
      "permute(Tensor x, Tensor? x_scales, Tensor expert_ids, int num_experts, int first_expert, "
      "int num_local_experts, int align, bool quantize, bool pow2_scale, int num_out_rows) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("unpermute(Tensor y, Tensor row_map, Tensor? weights, Tensor? shared_output) -> Tensor");
  // (grad_y [num_rows, H], grad_weights fp32 [T, K], or [0] when y is not given)
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor row_map, Tensor? weights, Tensor? y, int num_rows) "
      "-> (Tensor, Tensor)");

  // Expert parallelism (csrc/ep). Source-side layout: each token's destination ranks (ascending,
  // -1 padded), then the meta (local expert, eidx, gate weight per entry) beside each send row,
  // each pair's meta slot, the counts sent to each rank [W, 1 + L] and each (token, rank)'s send row
  // (packed, or at rank * capacity + slot); the send rows copied (or FP8-quantised) once per rank.
  // Receiver: the received rows
  // laid out expert-major -> (out, out_scales or [0], expert_offsets [L + 1], row_map [rows, K],
  // weights fp32 [rows, K]). The exchange: our own NCCL communicators, by registry id.
  m.def("ep_token_ranks(Tensor expert_ids, Tensor expert_rank, int num_ranks) -> Tensor");
  m.def(
      "ep_pack_meta(Tensor expert_ids, Tensor? weights, Tensor expert_rank, Tensor expert_local, "
      "Tensor expert_row_map, Tensor expert_offsets, Tensor rank_ids, Tensor send_row_map, Tensor "
      "rank_offsets, "
      "Tensor rank_experts, int capacity, int num_send_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ep_pack_rows(Tensor x, Tensor? x_scales, Tensor row_map, bool quantize, bool pow2_scale, int "
      "num_out_rows) "
      "-> (Tensor, Tensor)");
  m.def(
      "ep_unpack(Tensor recv_x, Tensor? recv_scales, Tensor recv_meta, Tensor recv_counts, int "
      "num_local_experts, "
      "int source_capacity, int align, int num_out_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The device path: rows pushed into the peers' windows (int64 addresses), counts and a flag
  // published with a system-scope release, flags awaited with acquire loads under a timeout.
  m.def(
      "ep_push_rows(Tensor peers, int region, int capacity, Tensor counts, int count_stride, Tensor src, "
      "int dst_offset) -> ()");
  m.def(
      "ep_signal(Tensor peers, int region, int flags_offset, Tensor? counts, int counts_offset, Tensor "
      "epoch) -> ()");
  m.def("ep_wait(Tensor flags, Tensor(a!) epoch, float timeout_s) -> ()");
  m.def("ep_nccl_unique_id() -> Tensor", &moe_kernels::ep_nccl_unique_id);
  m.def("ep_nccl_comm_init(Tensor unique_id, int world_size, int rank, int device) -> int",
        &moe_kernels::ep_nccl_comm_init);
  m.def("ep_nccl_comm_destroy(int comm) -> ()", &moe_kernels::ep_nccl_comm_destroy);
  m.def("ep_nccl_window_create(int comm, int bytes) -> int", &moe_kernels::ep_nccl_window_create);
  m.def("ep_nccl_window_tensor(int window) -> Tensor", &moe_kernels::ep_nccl_window_tensor);
  m.def("ep_nccl_window_peers(int window) -> Tensor", &moe_kernels::ep_nccl_window_peers);
  m.def("ep_nccl_window_destroy(int window) -> ()", &moe_kernels::ep_nccl_window_destroy);
  m.def(
      "ep_nccl_all_to_all_v(int comm, Tensor[] sends, Tensor(a!)[] recvs, int[] send_counts, int[] "
      "recv_counts) "
      "-> ()",
      &moe_kernels::ep_nccl_all_to_all_v);

  // Sticky device-side error flag (csrc/common/device_error.h): read and reset without a sync.
  m.def("device_error_code() -> int", &moe_kernels::device_error_code);
  m.def("clear_device_error() -> ()", &moe_kernels::clear_device_error);

  // Build facts.
  m.def("nccl_version() -> int", &moe_kernels::nccl_version);
}

// moe_kernels._C is loaded for its op registrations; it exports no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
