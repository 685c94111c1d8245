"""The bad-input matrix (issue 14, part 3): every public op and the MoE layer, one case per row.

Each row builds its inputs on a device and states what must happen:
- "raises": a ValueError whose message names the op and the argument (CPU and CUDA alike);
- "flag": an error only device data reveal (ids out of range, too few rows, corrupt offsets). The
  CPU implementation raises ValueError at once (documented); on CUDA the call returns and the
  sticky device-error flag makes ``check_device_errors()`` raise RuntimeError with the message;
- "raises_or_flag": either of the two (no mechanism is documented yet; both are acceptable);
- "accepted": a view the op must handle (non-contiguous, misaligned by one element, a -1 other
  than -1): the result equals the one on a clean copy of the inputs, or, where the op documents
  contiguity, a ValueError that names the argument.
docs/bad_inputs.md is the table of these rows. Rows marked `isolate` could corrupt the CUDA context
if the library mishandled them (a misaligned TMA load, an out-of-bounds atomic): on CUDA they run
in a child pytest process, so a crash or a hang fails that row alone.
"""

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import flatten, requires_sm90

import moe_kernels
from moe_kernels import MoE, RouterPreset
from moe_kernels.ops.grouped_gemm import grouped_gemm_dgrad, grouped_gemm_wgrad
from moe_kernels.testing import assert_bitwise_equal

FP8 = torch.float8_e4m3fn
BF16, I32, I64 = torch.bfloat16, torch.int32, torch.int64
CHILD = "MOE_KERNELS_BAD_INPUT_CHILD"  # set in the child process of an isolated row


@dataclass(frozen=True)
class Row:
    op: str
    bad: str
    kind: str  # "raises", "flag", "raises_or_flag", "accepted"
    call: Callable  # call(device) -> result; runs the op on the bad input
    match: str = ""  # regex the message must contain (names the op and the argument)
    flag: str = ""  # "flag": regex of the device-error message on CUDA
    good: Callable | None = None  # "accepted": good(device) -> the result on clean inputs
    gpu_only: bool = False  # device mixes: only a GPU machine has two devices
    isolate: bool = False

    @property
    def id(self) -> str:
        return f"{self.op}-{self.bad}".replace(" ", "_")


def rand(*shape, dtype=torch.float32, d="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(d)


def ints(*values, dtype=I32, d="cpu"):
    return torch.tensor(values, dtype=dtype, device=d)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values (every other column of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def other(d: str) -> str:
    return "cpu" if d == "cuda" else "cuda"


# -- the inputs of each op, on device d ----------------------------------------------------------


def router_ids(tokens, experts, top_k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, experts, generator=g).topk(top_k, dim=1).indices.to(I32).to(d)


def gemm_inputs(d, fp8=False, counts=(3, 0, 5), n=128, k=256):
    m = sum(counts)
    a, b = rand(m, k), rand(len(counts), n, k, seed=1) / 16
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=I32)
    if fp8:
        (a, a_s), (b, b_s) = moe_kernels.quantize_fp8(a), moe_kernels.quantize_fp8_weight(b)
        return a.to(d), b.to(d), offsets.to(d), dict(a_scales=a_s.to(d), b_scales=b_s.to(d))
    return a.to(BF16).to(d), b.to(BF16).to(d), offsets.to(d), {}


def gemm(d, a=None, b=None, offsets=None, **kw):
    a0, b0, o0, scales = gemm_inputs(d, fp8=kw.pop("fp8", False))
    args = {**scales, **kw}
    return moe_kernels.grouped_gemm(
        a0 if a is None else a, b0 if b is None else b, o0 if offsets is None else offsets, **args
    )


def mlp_inputs(d, e=2, h=128, i=128):
    w_gate_up, w_down = rand(e, 2 * i, h, dtype=BF16, d=d) / 8, rand(e, h, i, dtype=BF16, d=d, seed=1) / 8
    return rand(6, h, dtype=BF16, d=d), ints(0, 2, 6, d=d), w_gate_up, w_down


def fp8_mlp_without_x_scales(d):
    x, offsets, w_gate_up, w_down = mlp_inputs(d)
    (gu, gu_s), (dn, dn_s) = q8w(w_gate_up), q8w(w_down)
    return moe_kernels.expert_mlp(q8(x)[0], offsets, gu, dn, w_gate_up_scales=gu_s, w_down_scales=dn_s)


def small_moe(d):
    torch.manual_seed(0)
    return MoE(256, 128, RouterPreset(num_experts=4, top_k=2, score_func="softmax"), device=d).eval()


def moe_call(d, x):
    with torch.no_grad():
        return small_moe(d)(x)


LOGITS = lambda d: rand(5, 16, d=d)  # noqa: E731
X = lambda d: rand(4, 256, dtype=BF16, d=d)  # noqa: E731
IDS = lambda d: router_ids(4, 8, 2, d)  # noqa: E731


def permute_map(d):
    return moe_kernels.permute(X(d), IDS(d), 8).row_map


# ------------------------------------------------------------------------------------------------
# The rows
# ------------------------------------------------------------------------------------------------

q8, q8w, dq8 = moe_kernels.quantize_fp8, moe_kernels.quantize_fp8_weight, moe_kernels.dequantize_fp8
rt, perm, unperm = moe_kernels.router, moe_kernels.permute, moe_kernels.unpermute
bl, ub = moe_kernels.balance_loss, moe_kernels.update_expert_bias_

ROWS = [
    # -- quantize_fp8 / quantize_fp8_weight / dequantize_fp8 ------------------------------------
    Row(
        "quantize_fp8",
        "wrong dtype",
        "raises",
        lambda d: q8(ints(1, dtype=I32, d=d).expand(4, 128)),
        "quantize_fp8: x must be bfloat16",
    ),
    Row(
        "quantize_fp8",
        "wrong rank",
        "raises",
        lambda d: q8(rand(2, 4, 128, d=d)),
        r"quantize_fp8: x must be 2-D",
    ),
    Row(
        "quantize_fp8",
        "channels not a multiple of 128",
        "raises",
        lambda d: q8(rand(4, 100, d=d)),
        "quantize_fp8: x's channels must be a multiple of 128",
    ),
    Row(
        "quantize_fp8",
        "non-contiguous x",
        "accepted",
        lambda d: q8(strided(rand(4, 256, dtype=BF16, d=d))),
        good=lambda d: q8(rand(4, 256, dtype=BF16, d=d)),
    ),
    Row(
        "quantize_fp8",
        "misaligned x",
        "accepted",
        lambda d: q8(misaligned(rand(4, 256, dtype=BF16, d=d))),
        good=lambda d: q8(rand(4, 256, dtype=BF16, d=d)),
    ),
    Row(
        "quantize_fp8_weight",
        "wrong dtype",
        "raises",
        lambda d: q8w(ints(1, dtype=I32, d=d).expand(2, 128, 128)),
        "quantize_fp8_weight: w must be bfloat16",
    ),
    Row(
        "quantize_fp8_weight",
        "wrong rank",
        "raises",
        lambda d: q8w(rand(2, 2, 128, 128, d=d)),
        r"quantize_fp8_weight: w must be \[N, K\] or \[experts, N, K\]",
    ),
    Row(
        "quantize_fp8_weight",
        "K not a multiple of 128",
        "raises",
        lambda d: q8w(rand(2, 128, 100, d=d)),
        "quantize_fp8_weight: w's last dim K must be a multiple of 128",
    ),
    Row(
        "quantize_fp8_weight",
        "non-contiguous w",
        "accepted",
        lambda d: q8w(rand(2, 256, 128, d=d).transpose(1, 2)),
        good=lambda d: q8w(rand(2, 256, 128, d=d).transpose(1, 2).contiguous()),
    ),
    Row(
        "dequantize_fp8",
        "q not FP8",
        "raises",
        lambda d: dq8(rand(4, 128, dtype=BF16, d=d), rand(4, 1, d=d)),
        "dequantize_fp8: q must be",
    ),
    Row(
        "dequantize_fp8",
        "scales not fp32",
        "raises",
        lambda d: dq8(q8(rand(4, 128, d=d))[0], rand(4, 1, dtype=BF16, d=d)),
        "dequantize_fp8: scales must be",
    ),
    Row(
        "dequantize_fp8",
        "scales of the wrong shape",
        "raises",
        lambda d: dq8(q8(rand(4, 256, d=d))[0], rand(4, 3, d=d)),
        r"dequantize_fp8: scales .*fit neither 1x128 nor 128x128",
    ),
    Row(
        "dequantize_fp8",
        "q and scales on two devices",
        "raises",
        lambda d: dq8(q8(rand(4, 128, d=d))[0], rand(4, 1, d=other(d))),
        "dequantize_fp8: q and scales must be on the same device",
        gpu_only=True,
    ),
    # -- router / router_preset -------------------------------------------------------------------
    Row(
        "router",
        "wrong dtype",
        "raises",
        lambda d: rt(ints(1, d=d).expand(5, 16), 2),
        "router: logits must be",
    ),
    Row(
        "router",
        "wrong rank",
        "raises",
        lambda d: rt(rand(2, 5, 16, d=d), 2),
        r"router: logits must be 2-D \[tokens, experts\]",
    ),
    Row(
        "router",
        "one expert",
        "raises",
        lambda d: rt(rand(5, 1, d=d), 1),
        r"router: the number of experts \(logits.shape\[1\]\) must be in \[2, 1024\]",
    ),
    Row(
        "router",
        "more than 1024 experts",
        "raises",
        lambda d: rt(rand(2, 1025, d=d), 2),
        r"router: the number of experts .* got 1025",
    ),
    Row(
        "router",
        "top_k 0",
        "raises",
        lambda d: rt(LOGITS(d), 0),
        r"router: top_k must be in \[1, min\(16, experts=16\)\], got 0",
    ),
    Row(
        "router",
        "top_k above 16",
        "raises",
        lambda d: rt(rand(5, 64, d=d), 17),
        r"router: top_k must be in .* got 17",
    ),
    Row(
        "router",
        "bias not fp32",
        "raises",
        lambda d: rt(LOGITS(d), 2, bias=rand(16, dtype=BF16, d=d)),
        "router: bias must be",
    ),
    Row(
        "router",
        "bias of the wrong length (expert count)",
        "raises",
        lambda d: rt(LOGITS(d), 2, bias=rand(15, d=d)),
        r"router: bias must be \[experts=16\]",
    ),
    Row(
        "router",
        "num_groups not dividing E",
        "raises",
        lambda d: rt(LOGITS(d), 2, num_groups=3),
        "router: num_groups must be in",
    ),
    Row(
        "router",
        "topk_groups above num_groups",
        "raises",
        lambda d: rt(LOGITS(d), 2, num_groups=4, topk_groups=5),
        "router: topk_groups must be in",
    ),
    Row(
        "router",
        "top_k above the kept groups' experts",
        "raises",
        lambda d: rt(LOGITS(d), 5, num_groups=4, topk_groups=1),
        "router: top_k=5 exceeds the experts in the kept groups",
    ),
    Row(
        "router",
        "unknown score_func",
        "raises",
        lambda d: rt(LOGITS(d), 2, score_func="relu"),
        "router: score_func must be 'softmax' or 'sigmoid'",
    ),
    Row(
        "router",
        "non-contiguous logits",
        "accepted",
        lambda d: rt(strided(LOGITS(d)), 2, return_counts=True),
        good=lambda d: rt(LOGITS(d), 2, return_counts=True),
    ),
    Row(
        "router",
        "misaligned logits",
        "accepted",
        lambda d: rt(misaligned(LOGITS(d)), 2, return_counts=True),
        good=lambda d: rt(LOGITS(d), 2, return_counts=True),
    ),
    Row(
        "router",
        "bias on the other device",
        "raises",
        lambda d: rt(LOGITS(d), 2, bias=rand(16, d=other(d))),
        "router: bias and logits must be on the same device",
        gpu_only=True,
    ),
    Row(
        "router_preset",
        "logits of another expert count",
        "raises",
        lambda d: moe_kernels.router_preset(LOGITS(d), "deepseek_v3"),
        "router_preset: logits must have the preset's 256 experts, got 16",
    ),
    # -- balance_loss / update_expert_bias_ --------------------------------------------------------
    Row(
        "balance_loss",
        "expert_ids not integer",
        "raises",
        lambda d: bl(LOGITS(d), rand(5, 2, d=d)),
        "balance_loss: expert_ids must be int32 or int64",
    ),
    Row(
        "balance_loss",
        "expert_ids of another token count",
        "raises",
        lambda d: bl(LOGITS(d), router_ids(4, 16, 2, d)),
        r"balance_loss: expert_ids must be \[tokens=5",
    ),
    Row(
        "balance_loss",
        "expert id >= E",
        "raises_or_flag",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d).index_fill_(0, ints(2, dtype=I64, d=d), 16)),
        "expert_ids",
        isolate=True,
    ),
    Row(
        "balance_loss",
        "expert id -1",
        "raises_or_flag",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d).index_fill_(0, ints(2, dtype=I64, d=d), -1)),
        "expert_ids",
        isolate=True,
    ),
    Row(
        "balance_loss",
        "seq_offsets not ending at T (corrupt)",
        "raises_or_flag",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d), seq_offsets=ints(0, 2, d=d)),
        "seq_offsets",
        isolate=True,
    ),
    Row(
        "balance_loss",
        "seq_offsets decreasing (corrupt)",
        "raises_or_flag",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d), seq_offsets=ints(0, 4, 2, 5, d=d)),
        "seq_offsets",
        isolate=True,
    ),
    Row(
        "balance_loss",
        "seq_offsets int64",
        "accepted",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d), seq_offsets=ints(0, 2, 5, dtype=I64, d=d)),
        "balance_loss: seq_offsets must be",
        good=lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d), seq_offsets=ints(0, 2, 5, d=d)),
    ),
    Row(
        "balance_loss",
        "num_devices not dividing E",
        "raises",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, d), num_devices=3),
        "balance_loss: num_devices must be 0 .*or divide experts=16",
    ),
    Row(
        "balance_loss",
        "expert_ids on the other device",
        "raises",
        lambda d: bl(LOGITS(d), router_ids(5, 16, 2, other(d))),
        "balance_loss: expert_ids and logits must be on the same device",
        gpu_only=True,
    ),
    Row(
        "update_expert_bias_",
        "bias not fp32",
        "raises",
        lambda d: ub(torch.zeros(8, dtype=BF16, device=d), ints(*range(8), d=d), 1e-3),
        "update_expert_bias: bias must be",
    ),
    Row(
        "update_expert_bias_",
        "counts not integer",
        "raises",
        lambda d: ub(torch.zeros(8, device=d), torch.zeros(8, device=d), 1e-3),
        "update_expert_bias: counts must be int32 or int64",
    ),
    Row(
        "update_expert_bias_",
        "counts of another expert count",
        "raises",
        lambda d: ub(torch.zeros(8, device=d), ints(*range(7), d=d), 1e-3),
        r"update_expert_bias: (bias and )?counts must",
    ),
    Row(
        "update_expert_bias_",
        "non-contiguous bias",
        "accepted",
        lambda d: ub(strided(torch.zeros(8, device=d)), ints(*range(8), d=d), 1e-3),
        "update_expert_bias: bias must be a contiguous",
        good=lambda d: ub(torch.zeros(8, device=d), ints(*range(8), d=d), 1e-3),
    ),
    Row(
        "update_expert_bias_",
        "counts on the other device",
        "raises",
        lambda d: ub(torch.zeros(8, device=d), ints(*range(8), d=other(d)), 1e-3),
        "update_expert_bias: bias and counts must be on the same device",
        gpu_only=True,
    ),
    # -- permute ----------------------------------------------------------------------------------
    Row(
        "permute",
        "x wrong dtype",
        "raises",
        lambda d: perm(torch.zeros(4, 256, dtype=I32, device=d), IDS(d), 8),
        "permute: x must be bfloat16 or float16 or float32 or float8_e4m3fn",
    ),
    Row(
        "permute",
        "x wrong rank",
        "raises",
        lambda d: perm(rand(2, 4, 256, dtype=BF16, d=d), IDS(d), 8),
        r"permute: x must be 2-D \[tokens, hidden\]",
    ),
    Row(
        "permute",
        "expert_ids not integer",
        "raises",
        lambda d: perm(X(d), IDS(d).float(), 8),
        "permute: expert_ids must be int32 or int64",
    ),
    Row(
        "permute",
        "expert_ids wrong rank",
        "raises",
        lambda d: perm(X(d), IDS(d)[:, 0], 8),
        r"permute: expert_ids must be 2-D \[tokens, top_k\]",
    ),
    Row(
        "permute",
        "expert_ids of another token count",
        "raises",
        lambda d: perm(X(d), IDS(d)[:3], 8),
        "permute: expert_ids has 3 rows, x has 4",
    ),
    Row(
        "permute",
        "top_k above 32",
        "raises",
        lambda d: perm(X(d), torch.zeros(4, 33, dtype=I32, device=d), 64),
        r"permute: top_k \(expert_ids.shape\[1\]\) must be in \[1, 32\]",
    ),
    Row(
        "permute",
        "align not supported",
        "raises",
        lambda d: perm(X(d), IDS(d), 8, align=32),
        r"permute: align must be one of \(1, 16, 64, 128\)",
    ),
    Row(
        "permute",
        "local experts outside num_experts (expert counts)",
        "raises",
        lambda d: perm(X(d), IDS(d), 8, first_expert=6, num_local_experts=4),
        r"permute: local experts \[first_expert, first_expert \+ num_local_experts\) = \[6, 10\)",
    ),
    Row("permute", "num_experts 0", "raises", lambda d: perm(X(d), IDS(d), 0), "permute: local experts"),
    Row(
        "permute",
        "expert id >= num_experts",
        "flag",
        lambda d: perm(X(d), IDS(d).index_fill_(0, ints(1, dtype=I64, d=d), 8), 8),
        r"permute: expert_ids must be in \[-1, 8\)",
        flag=r"permute: expert_ids had values outside \[-1, num_experts\)",
    ),
    Row(
        "permute",
        "expert id below -1",
        "flag",
        lambda d: perm(X(d), IDS(d).index_fill_(0, ints(1, dtype=I64, d=d), -2), 8),
        r"permute: expert_ids must be in \[-1, 8\)",
        flag=r"permute: expert_ids had values outside \[-1, num_experts\)",
    ),
    Row(
        "permute",
        "num_out_rows too small",
        "flag",
        lambda d: perm(X(d), IDS(d), 8, num_out_rows=5),
        "permute: num_out_rows=5 is smaller than the 8 rows",
        flag="permute: num_out_rows was smaller than the rows the routing needs",
    ),
    Row(
        "permute",
        "num_out_rows negative",
        "raises",
        lambda d: perm(X(d), IDS(d), 8, num_out_rows=-1),
        r"permute: num_out_rows must be in \[0, 2\^31\)",
    ),
    Row(
        "permute",
        "FP8 x without x_scales",
        "raises",
        lambda d: perm(q8(X(d))[0], IDS(d), 8),
        "permute: x is float8_e4m3fn: pass its 1x128 scales as x_scales",
    ),
    Row(
        "permute",
        "x_scales of the wrong shape",
        "raises",
        lambda d: perm(q8(X(d))[0], IDS(d), 8, x_scales=rand(4, 3, d=d)),
        r"permute: x_scales must be float32 \[tokens, hidden/128\]",
    ),
    Row(
        "permute",
        "quantize with hidden not a multiple of 128",
        "raises",
        lambda d: perm(rand(4, 64, dtype=BF16, d=d), IDS(d), 8, quantize=True),
        "permute: x's channels must be a multiple of 128",
    ),
    Row(
        "permute",
        "rows not a multiple of 16 bytes",
        "raises",
        lambda d: perm(rand(4, 12, dtype=BF16, d=d), IDS(d), 8),
        "permute: x's rows must be a multiple of 16 bytes",
    ),
    Row(
        "permute",
        "non-contiguous x",
        "accepted",
        lambda d: perm(strided(X(d)), IDS(d), 8, quantize=True),
        good=lambda d: perm(X(d), IDS(d), 8, quantize=True),
    ),
    Row(
        "permute",
        "misaligned x",
        "accepted",
        lambda d: perm(misaligned(X(d)), IDS(d), 8),
        good=lambda d: perm(X(d), IDS(d), 8),
    ),
    Row(
        "permute",
        "non-contiguous expert_ids",
        "accepted",
        lambda d: perm(X(d), strided(IDS(d)), 8),
        good=lambda d: perm(X(d), IDS(d), 8),
    ),
    Row(
        "permute",
        "expert_ids on the other device",
        "raises",
        lambda d: perm(X(d), IDS(other(d)), 8),
        "permute: x and expert_ids must be on the same device",
        gpu_only=True,
    ),
    Row(
        "permute",
        "x_scales on the other device",
        "raises",
        lambda d: perm(q8(X(d))[0], IDS(d), 8, x_scales=q8(X(d))[1].to(other(d))),
        "permute: x and x_scales must be on the same device",
        gpu_only=True,
    ),
    # -- unpermute --------------------------------------------------------------------------------
    Row(
        "unpermute",
        "y wrong dtype",
        "raises",
        lambda d: unperm(torch.zeros(8, 256, dtype=I32, device=d), permute_map(d)),
        "unpermute: y must be bfloat16 or float16 or float32",
    ),
    Row(
        "unpermute",
        "y wrong rank",
        "raises",
        lambda d: unperm(rand(8 * 256, dtype=BF16, d=d), permute_map(d)),
        r"unpermute: y must be 2-D \[rows, hidden\]",
    ),
    Row(
        "unpermute",
        "row_map int64",
        "raises",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d).long()),
        "unpermute: row_map must be int32",
    ),
    Row(
        "unpermute",
        "row_map wrong rank",
        "raises",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d)[:, 0]),
        r"unpermute: row_map must be 2-D \[tokens, top_k\]",
    ),
    Row(
        "unpermute",
        "weights of the wrong shape",
        "raises",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d), rand(4, 3, d=d)),
        r"unpermute: weights must be \[tokens, top_k\]",
    ),
    Row(
        "unpermute",
        "weights integer",
        "raises",
        lambda d: unperm(
            rand(8, 256, dtype=BF16, d=d), permute_map(d), torch.ones(4, 2, dtype=I32, device=d)
        ),
        "unpermute: weights must be bfloat16 or float16 or float32",
    ),
    Row(
        "unpermute",
        "shared_output of the wrong shape",
        "raises",
        lambda d: unperm(
            rand(8, 256, dtype=BF16, d=d), permute_map(d), shared_output=rand(4, 128, dtype=BF16, d=d)
        ),
        r"unpermute: shared_output must be \[tokens, hidden\]",
    ),
    Row(
        "unpermute",
        "shared_output of another dtype",
        "raises",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d), shared_output=rand(4, 256, d=d)),
        "unpermute: shared_output must be bfloat16 like y",
    ),
    Row(
        "unpermute",
        "row_map past the rows of y",
        "flag",
        lambda d: unperm(
            rand(8, 256, dtype=BF16, d=d), permute_map(d).index_fill_(0, ints(1, dtype=I64, d=d), 8)
        ),
        "unpermute: row_map",
        flag="unpermute: row_map had rows >= the rows of y",
    ),
    Row(
        "unpermute",
        "row_map into an empty y",
        "flag",
        lambda d: unperm(torch.zeros(0, 256, dtype=BF16, device=d), permute_map(d)),
        "unpermute: row_map",
        flag="unpermute: row_map had rows >= the rows of y",
    ),
    Row(
        "unpermute",
        "row_map entry below -1 (counts as dropped)",
        "accepted",
        lambda d: unperm(
            rand(8, 256, dtype=BF16, d=d), permute_map(d).index_fill_(0, ints(1, dtype=I64, d=d), -7)
        ),
        good=lambda d: unperm(
            rand(8, 256, dtype=BF16, d=d), permute_map(d).index_fill_(0, ints(1, dtype=I64, d=d), -1)
        ),
    ),
    Row(
        "unpermute",
        "rows not a multiple of 16 bytes",
        "raises",
        lambda d: unperm(rand(8, 12, dtype=BF16, d=d), permute_map(d)),
        "unpermute: y's rows must be a multiple of 16 bytes",
    ),
    Row(
        "unpermute",
        "non-contiguous y",
        "accepted",
        lambda d: unperm(strided(rand(8, 256, dtype=BF16, d=d)), permute_map(d), rand(4, 2, d=d)),
        good=lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d), rand(4, 2, d=d)),
    ),
    Row(
        "unpermute",
        "misaligned y",
        "accepted",
        lambda d: unperm(misaligned(rand(8, 256, dtype=BF16, d=d)), permute_map(d)),
        good=lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d)),
    ),
    Row(
        "unpermute",
        "non-contiguous row_map and weights",
        "accepted",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), strided(permute_map(d)), strided(rand(4, 2, d=d))),
        good=lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d), rand(4, 2, d=d)),
    ),
    Row(
        "unpermute",
        "row_map on the other device",
        "raises",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(other(d))),
        "unpermute: y and row_map must be on the same device",
        gpu_only=True,
    ),
    Row(
        "unpermute",
        "weights on the other device",
        "raises",
        lambda d: unperm(rand(8, 256, dtype=BF16, d=d), permute_map(d), rand(4, 2, d=other(d))),
        "unpermute: y and weights must be on the same device",
        gpu_only=True,
    ),
    # -- grouped_gemm -----------------------------------------------------------------------------
    Row(
        "grouped_gemm", "a fp32", "raises", lambda d: gemm(d, a=rand(8, 256, d=d)), "grouped_gemm: a must be"
    ),
    Row(
        "grouped_gemm",
        "b of another dtype than a",
        "raises",
        lambda d: gemm(d, b=rand(3, 128, 256, d=d)),
        "grouped_gemm: b must have a's dtype",
    ),
    Row(
        "grouped_gemm",
        "a wrong rank",
        "raises",
        lambda d: gemm(d, a=rand(1, 8, 256, dtype=BF16, d=d)),
        r"grouped_gemm: a must be (2-D|\[rows, K\])",
    ),
    Row(
        "grouped_gemm",
        "b wrong rank",
        "raises",
        lambda d: gemm(d, b=rand(384, 256, dtype=BF16, d=d)),
        r"grouped_gemm: (b must be 3-D|a must be \[rows, K\] and b \[experts, N, K\])",
    ),
    Row(
        "grouped_gemm",
        "K not a multiple of 128",
        "raises",
        lambda d: gemm(d, a=rand(8, 200, dtype=BF16, d=d), b=rand(3, 128, 200, dtype=BF16, d=d)),
        r"grouped_gemm: K \(a.shape\[1\]\) must be a positive multiple of 128",
    ),
    Row(
        "grouped_gemm",
        "N not a multiple of 128",
        "raises",
        lambda d: gemm(d, b=rand(3, 100, 256, dtype=BF16, d=d)),
        r"grouped_gemm: N \(b.shape\[1\]\) must be a positive multiple of 128",
    ),
    Row(
        "grouped_gemm",
        "b's K differs from a's",
        "raises",
        lambda d: gemm(d, b=rand(3, 128, 128, dtype=BF16, d=d)),
        r"grouped_gemm: b must be \[experts, N, K=256\]",
    ),
    Row(
        "grouped_gemm",
        "expert_offsets int64",
        "raises",
        lambda d: gemm(d, offsets=ints(0, 3, 3, 8, dtype=I64, d=d)),
        "grouped_gemm: expert_offsets must be",
    ),
    Row(
        "grouped_gemm",
        "expert_offsets for another expert count",
        "raises",
        lambda d: gemm(d, offsets=ints(0, 3, 8, d=d)),
        r"grouped_gemm: expert_offsets must be \[experts \+ 1 = 4\]",
    ),
    Row(
        "grouped_gemm",
        "FP8 a without scales",
        "raises",
        lambda d: gemm(d, fp8=True, a_scales=None),
        "grouped_gemm: FP8 operands need a_scales and b_scales",
    ),
    Row(
        "grouped_gemm",
        "bf16 with scales",
        "raises",
        lambda d: gemm(d, a_scales=rand(8, 2, d=d), b_scales=rand(3, 1, 2, d=d)),
        "grouped_gemm: bfloat16 operands take no scales",
    ),
    Row(
        "grouped_gemm",
        "a_scales of the wrong shape",
        "raises",
        lambda d: gemm(d, fp8=True, a_scales=rand(8, 3, d=d)),
        "grouped_gemm: a_scales must be",
    ),
    Row(
        "grouped_gemm",
        "b_scales of the wrong shape",
        "raises",
        lambda d: gemm(d, fp8=True, b_scales=rand(3, 2, 2, d=d)),
        "grouped_gemm: b_scales must be",
    ),
    Row(
        "grouped_gemm",
        "unknown config",
        "raises",
        lambda d: gemm(d, config="fp8_huge"),
        "grouped_gemm: config must be",
    ),
    Row(
        "grouped_gemm",
        "out of the wrong shape",
        "raises",
        lambda d: gemm(d, out=torch.zeros(8, 256, dtype=BF16, device=d)),
        "grouped_gemm: out must be",
    ),
    Row(
        "grouped_gemm",
        "out not bf16",
        "raises",
        lambda d: gemm(d, out=torch.zeros(8, 128, device=d)),
        "grouped_gemm: out must be",
    ),
    Row(
        "grouped_gemm",
        "expert_offsets decreasing (corrupt)",
        "flag",
        lambda d: gemm(d, offsets=ints(0, 5, 3, 8, d=d)),
        r"grouped_gemm: expert_offsets must be non-decreasing",
        flag="grouped_gemm: expert_offsets were not non-decreasing",
    ),
    Row(
        "grouped_gemm",
        "expert_offsets decreasing (corrupt) with config bf16_wgmma_128x256",
        "flag",
        lambda d: gemm(d, offsets=ints(0, 5, 3, 8, d=d), config="bf16_wgmma_128x256"),
        r"grouped_gemm: expert_offsets must be non-decreasing",
        flag="grouped_gemm: expert_offsets were not non-decreasing",
    ),
    Row(
        "grouped_gemm",
        "expert_offsets past the rows of a (corrupt)",
        "flag",
        lambda d: gemm(d, offsets=ints(0, 3, 3, 9, d=d)),
        r"grouped_gemm: expert_offsets must be non-decreasing",
        flag="grouped_gemm: expert_offsets were not non-decreasing",
    ),
    Row(
        "grouped_gemm",
        "expert_offsets negative (corrupt)",
        "flag",
        lambda d: gemm(d, offsets=ints(-4, 3, 3, 8, d=d)),
        r"grouped_gemm: expert_offsets must be non-decreasing",
        flag="grouped_gemm: expert_offsets were not non-decreasing",
    ),
    Row(
        "grouped_gemm",
        "non-contiguous a",
        "accepted",
        lambda d: gemm(d, a=strided(gemm_inputs(d)[0])),
        "grouped_gemm: a and b must be contiguous",
        good=lambda d: gemm(d),
    ),
    Row(
        "grouped_gemm",
        "misaligned a",
        "accepted",
        lambda d: gemm(d, a=misaligned(gemm_inputs(d)[0])),
        r"grouped_gemm: a\b",
        good=lambda d: gemm(d),
        isolate=True,
    ),
    Row(
        "grouped_gemm",
        "misaligned a with config bf16_wgmma_128x256",
        "accepted",
        lambda d: gemm(d, a=misaligned(gemm_inputs(d)[0]), config="bf16_wgmma_128x256"),
        r"grouped_gemm: a\b",
        good=lambda d: gemm(d, config="bf16_wgmma_128x256"),
        isolate=True,
    ),
    Row(
        "grouped_gemm",
        "misaligned FP8 a",
        "accepted",
        lambda d: gemm(d, fp8=True, a=misaligned(gemm_inputs(d, fp8=True)[0])),
        r"grouped_gemm: a\b",
        good=lambda d: gemm(d, fp8=True),
        isolate=True,
    ),
    Row(
        "grouped_gemm",
        "non-contiguous expert_offsets",
        "accepted",
        lambda d: gemm(d, offsets=strided(gemm_inputs(d)[2])),
        "grouped_gemm: expert_offsets",
        good=lambda d: gemm(d),
        isolate=True,
    ),
    Row(
        "grouped_gemm",
        "misaligned out",
        "accepted",
        lambda d: gemm(d, out=misaligned(torch.zeros(8, 128, dtype=BF16, device=d))),
        "grouped_gemm: out",
        good=lambda d: gemm(d),
        isolate=True,
    ),
    Row(
        "grouped_gemm",
        "b on the other device",
        "raises",
        lambda d: gemm(d, b=gemm_inputs(other(d))[1]),
        "grouped_gemm: b and a must be on the same device",
        gpu_only=True,
    ),
    Row(
        "grouped_gemm",
        "expert_offsets on the other device",
        "raises",
        lambda d: gemm(d, offsets=gemm_inputs(other(d))[2]),
        "grouped_gemm: expert_offsets and a must be on the same device",
        gpu_only=True,
    ),
    # -- grouped_gemm backward, silu_mul, expert_mlp ------------------------------------------------
    Row(
        "grouped_gemm_dgrad",
        "grad_out fp32",
        "raises",
        lambda d: grouped_gemm_dgrad(rand(8, 128, d=d), *gemm_inputs(d)[1:3]),
        "grouped_gemm_dgrad: grad_out must be",
    ),
    Row(
        "grouped_gemm_dgrad",
        "expert_offsets decreasing (corrupt)",
        "flag",
        lambda d: grouped_gemm_dgrad(rand(8, 128, dtype=BF16, d=d), gemm_inputs(d)[1], ints(0, 5, 3, 8, d=d)),
        "expert_offsets must be non-decreasing",
        flag="grouped_gemm: expert_offsets were not non-decreasing",
    ),
    Row(
        "grouped_gemm_wgrad",
        "a of another row count",
        "raises",
        lambda d: grouped_gemm_wgrad(
            rand(8, 128, dtype=BF16, d=d), rand(7, 256, dtype=BF16, d=d), gemm_inputs(d)[2]
        ),
        "grouped_gemm_wgrad: a must have grad_out's 8 rows",
    ),
    Row(
        "grouped_gemm_wgrad",
        "out_dtype fp16",
        "raises",
        lambda d: grouped_gemm_wgrad(
            rand(8, 128, dtype=BF16, d=d), gemm_inputs(d)[0], gemm_inputs(d)[2], out_dtype=torch.float16
        ),
        "grouped_gemm_wgrad: out_dtype must be bfloat16 or float32",
    ),
    Row(
        "grouped_gemm_wgrad",
        "expert_offsets past the rows (corrupt)",
        "flag",
        lambda d: grouped_gemm_wgrad(rand(8, 128, dtype=BF16, d=d), gemm_inputs(d)[0], ints(0, 3, 3, 9, d=d)),
        "expert_offsets must be non-decreasing",
        flag="grouped_gemm: expert_offsets were not non-decreasing",
    ),
    Row(
        "silu_mul",
        "h fp32",
        "raises",
        lambda d: moe_kernels.silu_mul(rand(4, 256, d=d)),
        "silu_mul: h must be",
    ),
    Row(
        "silu_mul",
        "h wrong rank",
        "raises",
        lambda d: moe_kernels.silu_mul(rand(256, dtype=BF16, d=d)),
        r"silu_mul: h must be 2-D",
    ),
    Row(
        "silu_mul",
        "width not 2 x a multiple of 128",
        "raises",
        lambda d: moe_kernels.silu_mul(rand(4, 128, dtype=BF16, d=d)),
        "silu_mul: h's width must be 2 \\* intermediate",
    ),
    Row(
        "silu_mul",
        "expert_offsets int64",
        "accepted",
        lambda d: moe_kernels.silu_mul(rand(4, 256, dtype=BF16, d=d), ints(0, 4, dtype=I64, d=d)),
        "silu_mul: expert_offsets must be",
        good=lambda d: moe_kernels.silu_mul(rand(4, 256, dtype=BF16, d=d), ints(0, 4, d=d)),
    ),
    Row(
        "silu_mul",
        "non-contiguous h",
        "accepted",
        lambda d: moe_kernels.silu_mul(strided(rand(4, 256, dtype=BF16, d=d)), quantize=True),
        good=lambda d: moe_kernels.silu_mul(rand(4, 256, dtype=BF16, d=d), quantize=True),
    ),
    Row(
        "expert_mlp",
        "w_gate_up for another expert count",
        "raises",
        lambda d: moe_kernels.expert_mlp(
            *mlp_inputs(d)[:2], rand(3, 256, 128, dtype=BF16, d=d), mlp_inputs(d)[3]
        ),
        r"expert_mlp: w_gate_up, w_down and expert_offsets must agree on the experts: w_gate_up has 3",
    ),
    Row(
        "expert_mlp",
        "w_down of another hidden size",
        "raises",
        lambda d: moe_kernels.expert_mlp(*mlp_inputs(d)[:3], rand(2, 256, 256, dtype=BF16, d=d)),
        r"expert_mlp: w_down must be \[experts=2, hidden=128, intermediate=128\]",
    ),
    Row(
        "expert_mlp",
        "FP8 x without x_scales",
        "raises",
        lambda d: fp8_mlp_without_x_scales(d),
        "expert_mlp: float8_e4m3fn x needs x_scales",
    ),
    # -- the MoE layer ------------------------------------------------------------------------------
    Row(
        "MoE",
        "x fp32",
        "raises",
        lambda d: moe_call(d, rand(4, 256, d=d)),
        "MoE: x must be bfloat16, got torch.float32",
    ),
    Row(
        "MoE",
        "x integer",
        "raises",
        lambda d: moe_call(d, torch.zeros(4, 256, dtype=I32, device=d)),
        "MoE: x must be bfloat16, got torch.int32",
    ),
    Row(
        "MoE",
        "x of another hidden size",
        "raises",
        lambda d: moe_call(d, rand(4, 128, dtype=BF16, d=d)),
        r"MoE: x must be \[\.\.\., 256\], got \[4, 128\]",
    ),
    Row(
        "MoE",
        "non-contiguous x",
        "accepted",
        lambda d: moe_call(d, strided(rand(2, 3, 256, dtype=BF16, d=d))),
        good=lambda d: moe_call(d, rand(2, 3, 256, dtype=BF16, d=d)),
    ),
    Row(
        "MoE",
        "misaligned x",
        "accepted",
        lambda d: moe_call(d, misaligned(rand(5, 256, dtype=BF16, d=d))),
        good=lambda d: moe_call(d, rand(5, 256, dtype=BF16, d=d)),
    ),
    Row(
        "MoE",
        "x on the other device than the layer",
        "raises",
        lambda d: small_moe(d)(rand(4, 256, dtype=BF16, d=other(d))),
        "MoE: x is on .*, the layer on",
        gpu_only=True,
    ),
]


# ------------------------------------------------------------------------------------------------
# Running a row
# ------------------------------------------------------------------------------------------------


def assert_same_results(got, want, case):
    got, want = flatten(got), flatten(want)
    assert len(got) == len(want), case
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_bitwise_equal(g.cpu().reshape(-1), w.cpu().reshape(-1), f"{case}: output {i}")  # 0-d too


def check_row(row: Row, device: str) -> None:
    case = f"{row.id} on {device}"
    if row.kind == "raises":
        with pytest.raises(ValueError, match=row.match):
            row.call(device)
    elif row.kind == "flag" and device == "cpu":
        with pytest.raises(ValueError, match=row.match):
            row.call(device)
    elif row.kind == "flag":
        row.call(device)  # returns: the kernel found the error in device data
        with pytest.raises(RuntimeError, match=row.flag):
            moe_kernels.check_device_errors()
    elif row.kind == "raises_or_flag":
        with pytest.raises((ValueError, RuntimeError), match=row.match):
            row.call(device)
            moe_kernels.check_device_errors()
    elif row.kind == "accepted":
        try:
            got = row.call(device)
        except ValueError as error:
            assert row.match and re.search(row.match, str(error)), (
                f"{case}: raised {error!r}, which does not name the argument ({row.match!r})"
            )
            return
        moe_kernels.check_device_errors()
        assert_same_results(got, row.good(device), case)
    else:
        raise AssertionError(f"unknown kind {row.kind}")


def run_isolated(nodeid: str, rootdir) -> None:
    """Run one test in a child pytest: a crash or a hang there fails this row, not the session."""
    env = {**os.environ, CHILD: "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", nodeid, "-q", "-p", "no:cacheprovider"],
            cwd=rootdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{nodeid}: hung (no result within 300 s)")
    assert done.returncode == 0, (
        f"{nodeid}: child exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    )


@pytest.fixture(autouse=True)
def clean_device_error_flag():
    """Every row starts with a clear flag and must leave it clear (a stray flag fails the row)."""
    moe_kernels.check_device_errors()
    yield
    moe_kernels.check_device_errors()


def _params():
    for row in ROWS:
        # A CPU/GPU device mix has no CPU-only variant: those rows run on CUDA alone.
        for device in ("cuda",) if row.gpu_only else ("cpu", "cuda"):
            marks = [requires_sm90] if device == "cuda" else []
            yield pytest.param(row, device, id=f"{row.id}-{device}", marks=marks)


@pytest.mark.parametrize("row, device", list(_params()))
def test_bad_input(row, device, request):
    if device == "cuda" and row.isolate and not os.environ.get(CHILD):
        run_isolated(request.node.nodeid, request.config.rootpath)
        return
    check_row(row, device)


def test_every_public_op_has_rows():
    """The matrix covers every public op that takes tensors (and the layer)."""
    covered = {row.op for row in ROWS}
    public = {
        "quantize_fp8",
        "quantize_fp8_weight",
        "dequantize_fp8",
        "router",
        "router_preset",
        "balance_loss",
        "update_expert_bias_",
        "permute",
        "unpermute",
        "grouped_gemm",
        "silu_mul",
        "expert_mlp",
        "MoE",
    }
    assert public <= set(moe_kernels.__all__) | {"MoE"}
    assert public <= covered, sorted(public - covered)
