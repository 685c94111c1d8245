"""Soak (issue 14, part 6): 10,000 calls of the MoE layer with random T (0 to 8192) and random
routing. Allocated memory must not grow, no device error may be raised, and every 500th call is
checked against the reference.

The GPU test is marked `soak` and runs only with `-m soak` (it takes minutes, not seconds; see
conftest.py). Run it as `python -m pytest tests/test_soak.py -m soak -s` to see the figures it
prints (also recorded as junit properties). A short run of the same loop on the CPU path checks the
loop itself in the default suite.
"""

import time

import pytest
import torch
from conftest import requires_sm90
from test_layer import ROUTERS, reference_forward

import moe_kernels
from moe_kernels import MoE
from moe_kernels.testing import calc_diff

BF16 = torch.bfloat16
ROUTER = ROUTERS["deepseek_v3"]  # DeepSeek-V3's router semantics at a small size
HIDDEN, INTER, SHARED = 128, 128, 128
LEAK_SLACK_BYTES = 1 << 20  # one leaked block per call (>= 512 bytes) over 10,000 calls is 5 MB


def make_layer(device: str, fp8: bool) -> MoE:
    torch.manual_seed(0)
    moe = MoE(HIDDEN, INTER, ROUTER, shared_intermediate_size=SHARED, device=device, init_std=0.05).eval()
    return moe.quantize_() if fp8 else moe


def new_routing(moe: MoE, gen: torch.Generator) -> None:
    """A fresh expert bias: mostly random, sometimes one expert forced hot (every token) or cold."""
    bias = torch.randn(ROUTER.num_experts, generator=gen) * 0.2
    pick = int(torch.randint(0, 4, (1,), generator=gen))
    expert = int(torch.randint(0, ROUTER.num_experts, (1,), generator=gen))
    if pick == 0:
        bias[expert] = 10.0  # sigmoid scores lie in (0, 1): every token takes this expert
    elif pick == 1:
        bias[expert] = -10.0  # and no token this one
    moe.expert_bias.copy_(bias)


def soak(device: str, fp8: bool, calls: int, max_tokens: int, check_every: int) -> dict:
    """Run the loop; returns its figures. Raises on a device error or a wrong spot check."""
    moe, ref_moe = make_layer(device, fp8), make_layer("cpu", fp8)
    gen = torch.Generator().manual_seed(1234)  # T and routing, drawn on the host
    x_gen = torch.Generator(device=device).manual_seed(1234)  # tokens, drawn where they are used
    cuda = device == "cuda"

    def call(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(tokens, HIDDEN, generator=x_gen, device=device, dtype=BF16)
        return x, moe(x)

    with torch.no_grad():
        for tokens in (max_tokens, 0, 1, max_tokens // 2):  # warm-up: allocator and lazy state settle
            call(tokens)
        if cuda:
            torch.cuda.synchronize()
        moe_kernels.check_device_errors()
        start_alloc = torch.cuda.memory_allocated() if cuda else 0
        start_reserved = torch.cuda.memory_reserved() if cuda else 0
        started, checked = time.perf_counter(), 0
        for i in range(calls):
            new_routing(moe, gen)
            tokens = 0 if i % 97 == 0 else int(torch.randint(0, max_tokens + 1, (1,), generator=gen))
            x, out = call(tokens)
            assert out.shape == x.shape, f"call {i}: {tokens=}"
            if i % check_every == 0:
                moe_kernels.check_device_errors()  # synchronises: a kernel error shows here
                ref_moe.load_state_dict(moe.state_dict())
                ref = reference_forward(ref_moe, x.cpu())
                if tokens:
                    err = calc_diff(out.cpu().float(), ref.float())
                    assert err < (2e-3 if fp8 else 1e-4), f"call {i}: {tokens=} calc_diff {err}"
                checked += 1
            del x, out
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        moe_kernels.check_device_errors()
        end_alloc = torch.cuda.memory_allocated() if cuda else 0
        end_reserved = torch.cuda.memory_reserved() if cuda else 0
    return dict(
        calls=calls,
        seconds=round(seconds, 2),
        spot_checks=checked,
        allocated_start=start_alloc,
        allocated_end=end_alloc,
        reserved_start=start_reserved,
        reserved_end=end_reserved,
    )


@pytest.mark.soak
@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
def test_layer_soak(fp8, record_property):
    figures = soak("cuda", fp8, calls=10_000, max_tokens=8192, check_every=500)
    print(f"\nsoak {fp8=}: {figures}")
    for name, value in figures.items():
        record_property(name, value)
    grown = figures["allocated_end"] - figures["allocated_start"]
    assert grown <= LEAK_SLACK_BYTES, f"allocated memory grew by {grown} bytes over {figures['calls']} calls"


@pytest.mark.parametrize("fp8", [False, True])
def test_soak_loop_on_cpu(fp8):
    """The same loop, short, on the CPU path: the spot checks there are bit-equal references."""
    figures = soak("cpu", fp8, calls=12, max_tokens=64, check_every=3)
    assert figures["spot_checks"] == 4
