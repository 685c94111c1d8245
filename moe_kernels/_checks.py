"""Argument checks shared by the references, the fake kernels and the CPU implementations.

Messages follow one form, the same as the C++ launchers':
``<op>: <argument> must be <expected>, got <value>``.
They raise ValueError (the C++ side raises it too, through TORCH_CHECK_VALUE).
"""

import torch

FP8 = torch.float8_e4m3fn  # the one FP8 format of the package (e4m3, DESIGN.md §3)
QUANT_BLOCK = 128
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {message}")


def check_dim(t: torch.Tensor, ndim: int, op: str, name: str, layout: str) -> None:
    check(t.dim() == ndim, op, f"{name} must be {ndim}-D {layout}, got shape {list(t.shape)}")


def check_dtype(t: torch.Tensor, dtypes, op: str, name: str) -> None:
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    check(t.dtype in dtypes, op, f"{name} must be {names}, got {str(t.dtype).removeprefix('torch.')}")


def check_quant_channels(channels: int, op: str, name: str) -> None:
    check(
        channels % QUANT_BLOCK == 0,
        op,
        f"{name}'s channels must be a multiple of 128 (one scale per 128), got {channels}",
    )


def check_quantize_fp8_args(x: torch.Tensor) -> None:
    op = "quantize_fp8"
    check_dim(x, 2, op, "x", "[rows, channels]")
    check_dtype(x, FLOAT_DTYPES, op, "x")
    check_quant_channels(x.shape[1], op, "x")


def check_quantize_fp8_weight_args(w: torch.Tensor) -> None:
    op = "quantize_fp8_weight"
    check(w.dim() in (2, 3), op, f"w must be [N, K] or [experts, N, K], got shape {list(w.shape)}")
    check_dtype(w, FLOAT_DTYPES, op, "w")
    check(w.shape[-1] % QUANT_BLOCK == 0, op, f"w's last dim K must be a multiple of 128, got {w.shape[-1]}")


# ------------------------------------------------------------------------------------------------
# Permute / unpermute (the CUDA launchers in csrc/permute check the same things, with the same words)
# ------------------------------------------------------------------------------------------------

PERMUTE_ALIGNMENTS = (1, 16, 64, 128)
PERMUTE_MAX_TOP_K = 32
PERMUTE_MAX_LOCAL_EXPERTS = 1024
INT32_MAX = 2**31 - 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_same_device(a: torch.Tensor, b: torch.Tensor, op: str, name_a: str, name_b: str) -> None:
    check(
        a.device == b.device,
        op,
        f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}",
    )


def check_row_bytes(t: torch.Tensor, op: str, name: str) -> None:
    """Rows move as 16-byte vectors."""
    per_vector = 16 // t.element_size()
    check(
        t.shape[1] * t.element_size() % 16 == 0,
        op,
        f"{name}'s rows must be a multiple of 16 bytes (hidden a multiple of {per_vector} for "
        f"{_dtype_name(t.dtype)}), got hidden={t.shape[1]}",
    )


def check_expert_ids(expert_ids: torch.Tensor, op: str) -> None:
    """expert_ids: int32 or int64 [tokens, top_k] with 1 <= top_k <= 32 (permute and the EP layout)."""
    check_dim(expert_ids, 2, op, "expert_ids", "[tokens, top_k]")
    check_dtype(expert_ids, (torch.int32, torch.int64), op, "expert_ids")
    top_k = expert_ids.shape[1]
    check(
        1 <= top_k <= PERMUTE_MAX_TOP_K,
        op,
        f"top_k (expert_ids.shape[1]) must be in [1, {PERMUTE_MAX_TOP_K}], got {top_k}",
    )


def check_permute_args(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    expert_ids: torch.Tensor,
    num_experts: int,
    first_expert: int,
    num_local_experts: int,
    align: int,
    quantize: bool,
    num_out_rows: int,
) -> None:
    op = "permute"
    check_dim(x, 2, op, "x", "[tokens, hidden]")
    check_expert_ids(expert_ids, op)
    check_same_device(x, expert_ids, op, "x", "expert_ids")
    check_dtype(x, (*FLOAT_DTYPES, FP8), op, "x")
    tokens, top_k = expert_ids.shape
    check(tokens == x.shape[0], op, f"expert_ids has {tokens} rows, x has {x.shape[0]}")
    check(align in PERMUTE_ALIGNMENTS, op, f"align must be one of {PERMUTE_ALIGNMENTS}, got {align}")
    last = first_expert + num_local_experts
    check(
        1 <= num_experts <= INT32_MAX
        and first_expert >= 0
        and 1 <= num_local_experts <= PERMUTE_MAX_LOCAL_EXPERTS
        and last <= num_experts,
        op,
        f"local experts [first_expert, first_expert + num_local_experts) = [{first_expert}, {last}) must "
        f"lie in [0, num_experts={num_experts}) and hold 1 to {PERMUTE_MAX_LOCAL_EXPERTS} experts",
    )
    if x.dtype == FP8:
        check(x_scales is not None, op, "x is float8_e4m3fn: pass its 1x128 scales as x_scales")
        check(not quantize, op, "x is already FP8: quantize must be False")
    if x.dtype == FP8 or quantize:
        check_quant_channels(x.shape[1], op, "x")
    check_row_bytes(x, op, "x")
    if x_scales is not None:
        check(x.dtype == FP8, op, f"x_scales is only for float8_e4m3fn x, got x {_dtype_name(x.dtype)}")
        check_same_device(x, x_scales, op, "x", "x_scales")
        expected = [x.shape[0], x.shape[1] // QUANT_BLOCK]
        check(
            x_scales.dtype == torch.float32 and list(x_scales.shape) == expected,
            op,
            f"x_scales must be float32 [tokens, hidden/128] = {expected}, got "
            f"{_dtype_name(x_scales.dtype)} {list(x_scales.shape)}",
        )
    check(0 <= num_out_rows <= INT32_MAX, op, f"num_out_rows must be in [0, 2^31), got {num_out_rows}")
    bound = tokens * top_k + num_local_experts * (align - 1)
    check(
        bound <= INT32_MAX,
        op,
        f"tokens * top_k + local experts * (align - 1) = {bound} rows must fit in int32",
    )


def check_rows_and_map(
    rows: torch.Tensor, rows_name: str, row_map: torch.Tensor, weights: torch.Tensor | None, op: str
) -> None:
    """unpermute / unpermute_backward: rows [?, hidden] (y or grad_out), row_map, weights."""
    check_dim(rows, 2, op, rows_name, "[rows, hidden]")
    check_dtype(rows, FLOAT_DTYPES, op, rows_name)
    check_row_bytes(rows, op, rows_name)
    check_dim(row_map, 2, op, "row_map", "[tokens, top_k]")
    check_same_device(rows, row_map, op, rows_name, "row_map")
    check_dtype(row_map, torch.int32, op, "row_map")
    top_k = row_map.shape[1]
    check(
        1 <= top_k <= PERMUTE_MAX_TOP_K,
        op,
        f"top_k (row_map.shape[1]) must be in [1, {PERMUTE_MAX_TOP_K}], got {top_k}",
    )
    if weights is not None:
        check_same_device(rows, weights, op, rows_name, "weights")
        check(
            weights.shape == row_map.shape,
            op,
            f"weights must be [tokens, top_k] = {list(row_map.shape)} like row_map, "
            f"got {list(weights.shape)}",
        )
        check_dtype(weights, FLOAT_DTYPES, op, "weights")


def check_unpermute_args(
    y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None, shared_output: torch.Tensor | None
) -> None:
    op = "unpermute"
    check_rows_and_map(y, "y", row_map, weights, op)
    if shared_output is not None:
        check_same_device(y, shared_output, op, "y", "shared_output")
        expected = [row_map.shape[0], y.shape[1]]
        check(
            list(shared_output.shape) == expected,
            op,
            f"shared_output must be [tokens, hidden] = {expected}, got {list(shared_output.shape)}",
        )
        check(
            shared_output.dtype == y.dtype,
            op,
            f"shared_output must be {_dtype_name(y.dtype)} like y, got {_dtype_name(shared_output.dtype)}",
        )


def check_unpermute_backward_args(
    grad_out: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None,
    y: torch.Tensor | None,
    num_rows: int,
) -> None:
    op = "unpermute_backward"
    check_rows_and_map(grad_out, "grad_out", row_map, weights, op)
    check(
        grad_out.shape[0] == row_map.shape[0],
        op,
        f"grad_out has {grad_out.shape[0]} rows, row_map has {row_map.shape[0]}",
    )
    check(num_rows >= 0, op, f"num_rows must be >= 0, got {num_rows}")
    if y is not None:
        check_same_device(grad_out, y, op, "grad_out", "y")
        expected = [num_rows, grad_out.shape[1]]
        check(
            list(y.shape) == expected, op, f"y must be [num_rows, hidden] = {expected}, got {list(y.shape)}"
        )
        check(
            y.dtype == grad_out.dtype,
            op,
            f"y must be {_dtype_name(grad_out.dtype)} like grad_out, got {_dtype_name(y.dtype)}",
        )
