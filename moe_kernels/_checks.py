"""Argument checks shared by the references, the fake kernels and the CPU implementations.

Messages follow one form, the same as the C++ launchers':
``<op>: <argument> must be <expected>, got <value>``.
They raise ValueError (the C++ side raises it too, through TORCH_CHECK_VALUE).
"""

import torch

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
