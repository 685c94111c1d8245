"""Front doors of the expert-parallel ops (csrc/ep), with their CPU implementations (the references)
and fake kernels. Only moe_kernels.distributed uses them; the user-facing API is ExpertParallel."""

import torch

from moe_kernels import reference
from moe_kernels._checks import FP8, QUANT_BLOCK, check_expert_ids
from moe_kernels.ops._library import register_cpu, register_fake

META_FIELDS = 3  # local expert, eidx, gate weight bits (csrc/include/moe_kernels/ep.cuh)


def token_ranks(expert_ids: torch.Tensor, expert_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """int32 [T, K]: each token's distinct destination ranks, ascending, -1 padded."""
    return torch.ops.moe_kernels.ep_token_ranks(expert_ids, expert_rank, num_ranks)


# (meta int32 [S, 3, K], pair_slot int32 [T, K], send_counts int32 [W, 1 + L], send_rows int32
# [T, K]) from (expert_ids, weights, expert_rank, expert_local, expert_row_map, expert_offsets,
# rank_ids, send_row_map, rank_offsets, rank_experts, capacity, num_send_rows): see
# reference.ep_pack_meta. Every output is always a tensor, so the op is called as it is.
pack_meta = torch.ops.moe_kernels.ep_pack_meta


def pack_rows(x, x_scales, row_map, quantize, pow2_scale, num_out_rows):
    """(out [R, H], out_scales [R, H/128] or None): see reference.copy_rows."""
    out, scales = torch.ops.moe_kernels.ep_pack_rows(x, x_scales, row_map, quantize, pow2_scale, num_out_rows)
    return out, scales if (quantize or x.dtype == FP8) else None


def unpack(
    recv_x, recv_scales, recv_meta, recv_counts, num_local_experts, source_capacity, align, num_out_rows
):
    """(out, out_scales or None, expert_offsets, row_map, weights); see reference.ep_unpack."""
    out, out_scales, offsets, row_map, weights = torch.ops.moe_kernels.ep_unpack(
        recv_x, recv_scales, recv_meta, recv_counts, num_local_experts, source_capacity, align, num_out_rows
    )
    return out, out_scales if recv_x.dtype == FP8 else None, offsets, row_map, weights


# ------------------------------------------------------------------------------------------------
# CPU implementations (the references) and fake kernels
# ------------------------------------------------------------------------------------------------


@register_cpu("ep_token_ranks")
def _token_ranks_cpu(expert_ids, expert_rank, num_ranks):
    check_expert_ids(expert_ids, "ep_token_ranks")
    return reference.ep_token_ranks(expert_ids, expert_rank, num_ranks)


@register_fake("ep_token_ranks")
def _token_ranks_fake(expert_ids, expert_rank, num_ranks):
    check_expert_ids(expert_ids, "ep_token_ranks")
    return expert_ids.new_empty(tuple(expert_ids.shape), dtype=torch.int32)


@register_cpu("ep_pack_meta")
def _pack_meta_cpu(*args):
    check_expert_ids(args[0], "ep_pack_meta")
    return reference.ep_pack_meta(*args)


@register_fake("ep_pack_meta")
def _pack_meta_fake(
    expert_ids,
    weights,
    expert_rank,
    expert_local,
    expert_row_map,
    expert_offsets,
    rank_ids,
    send_row_map,
    rank_offsets,
    rank_experts,
    capacity,
    num_send_rows,
):
    check_expert_ids(expert_ids, "ep_pack_meta")
    t, k = expert_ids.shape
    meta = expert_ids.new_empty((num_send_rows, META_FIELDS, k), dtype=torch.int32)
    pair_slot = expert_ids.new_empty((t, k), dtype=torch.int32)
    counts = expert_ids.new_empty((rank_experts.shape[0], 1 + rank_experts.shape[1]), dtype=torch.int32)
    return meta, pair_slot, counts, expert_ids.new_empty((t, k), dtype=torch.int32)


@register_cpu("ep_pack_rows")
def _pack_rows_cpu(x, x_scales, row_map, quantize, pow2_scale, num_out_rows):
    out, scales = reference.copy_rows(x, x_scales, row_map, quantize, pow2_scale, num_out_rows)
    return out, x.new_empty(0, dtype=torch.float32) if scales is None else scales


@register_fake("ep_pack_rows")
def _pack_rows_fake(x, x_scales, row_map, quantize, pow2_scale, num_out_rows):
    fp8 = quantize or x.dtype == FP8
    out = x.new_empty((num_out_rows, x.shape[1]), dtype=FP8 if fp8 else x.dtype)
    scales_shape = (num_out_rows, x.shape[1] // QUANT_BLOCK) if fp8 else (0,)
    return out, x.new_empty(scales_shape, dtype=torch.float32)


@register_cpu("ep_unpack")
def _unpack_cpu(recv_x, recv_scales, recv_meta, recv_counts, num_local, capacity, align, num_out_rows):
    out, scales, offsets, row_map, weights = reference.ep_unpack(
        recv_x, recv_scales, recv_meta, recv_counts, num_local, capacity, align, num_out_rows
    )
    return (
        out,
        recv_x.new_empty(0, dtype=torch.float32) if scales is None else scales,
        offsets,
        row_map,
        weights,
    )


@register_fake("ep_unpack")
def _unpack_fake(recv_x, recv_scales, recv_meta, recv_counts, num_local, capacity, align, num_out_rows):
    hidden = recv_x.shape[1]
    out = recv_x.new_empty((num_out_rows, hidden))
    scales_shape = (num_out_rows, hidden // QUANT_BLOCK) if recv_x.dtype == FP8 else (0,)
    scales = recv_x.new_empty(scales_shape, dtype=torch.float32)
    offsets = recv_x.new_empty((num_local + 1,), dtype=torch.int32)
    row_map = recv_x.new_empty((recv_x.shape[0], recv_meta.shape[2]), dtype=torch.int32)
    weights = recv_x.new_empty((recv_x.shape[0], recv_meta.shape[2]), dtype=torch.float32)
    return out, scales, offsets, row_map, weights
