"""Tolerances and error metrics (DESIGN.md §6), written down once per precision family:

FP8 GEMMs          calc_diff(out, ref) < FP8_GEMM_CALC_DIFF, against the reference run on the
                   same quantised inputs
bf16 arithmetic    rel_error(out, ref) <= BF16_ERROR_FACTOR * rel_error(torch's own bf16, ref)
router weights     fp32 arithmetic: ROUTER_WEIGHT_RTOL / ROUTER_WEIGHT_ATOL
data movement and FP8 quantisation: bit-exact (torch.equal on the raw bytes)
"""

import torch

FP8_GEMM_CALC_DIFF = 1e-3
BF16_ERROR_FACTOR = 2.0
ROUTER_WEIGHT_RTOL = 1e-5
ROUTER_WEIGHT_ATOL = 1e-6

# ------------------------------------------------------------------------------------------------
# Error metrics
# ------------------------------------------------------------------------------------------------


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf if out has a NaN or inf that ref has not)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error 1 − 2<x,y> / (<x,x> + <y,y>) in float64 (0 when equal)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum().item()
    return 0.0 if denom == 0 else 1.0 - 2.0 * (x * y).sum().item() / denom


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """Exact equality of values and raw bytes; NaNs must sit in the same places (any NaN pattern)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (
        f"{msg}: shape/dtype {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}"
    )
    out_nan, ref_nan = torch.isnan(out.float()), torch.isnan(ref.float())
    assert torch.equal(out_nan, ref_nan), (
        f"{msg}: NaN positions differ ({int((out_nan != ref_nan).sum())} places)"
    )
    raw_out, raw_ref = _raw_bytes(out)[~_byte_mask(out_nan, out)], _raw_bytes(ref)[~_byte_mask(ref_nan, ref)]
    if not torch.equal(raw_out, raw_ref):
        mismatch = (out.float() != ref.float()) & ~out_nan
        first = mismatch.nonzero()[:3].tolist()
        raise AssertionError(f"{msg}: {int(mismatch.sum())} elements differ, first at {first}")


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(*t.shape, t.element_size())


def _byte_mask(nan: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nan.unsqueeze(-1).expand(*t.shape, t.element_size())


def poison_allocator_(device: str = "cuda", nbytes: int = 64 << 20) -> None:
    """Fill free blocks of torch's caching allocator with 0xFF bytes (NaN in fp32, bf16 and e4m3)
    so that outputs an op allocates start poisoned: an element the kernel forgets to write shows up
    as NaN in a bit-exact comparison."""
    sizes = [nbytes >> s for s in range(0, 16, 2)] + [512 * (1 << s) for s in range(12)]
    blocks = [torch.empty(n, dtype=torch.uint8, device=device).fill_(0xFF) for n in sizes]
    del blocks
