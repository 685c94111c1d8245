"""Expert-parallel test and benchmark helpers: routed inputs for W ranks, a row-wise stand-in for
the expert MLP, and the checks of dispatch / combine against the references (bit for bit)."""

import torch

from moe_kernels import reference
from moe_kernels.distributed import ExpertMap
from moe_kernels.testing.numeric import assert_bitwise_equal


def uneven_expert_map(num_experts: int, num_ranks: int, gen: torch.Generator) -> list[int]:
    """A random expert -> rank map where every rank holds at least one expert, the rest at random."""
    ranks = torch.cat(
        [torch.arange(num_ranks), torch.randint(0, num_ranks, (num_experts - num_ranks,), generator=gen)]
    )
    return ranks[torch.randperm(num_experts, generator=gen)].tolist()


def routed_ids(
    tokens: int, top_k: int, experts: list[int], gen: torch.Generator, drop: float = 0.0
) -> torch.Tensor:
    """int32 [T, K]: per token, K distinct ids drawn uniformly from `experts` (-1 where fewer),
    about `drop` of them replaced by -1."""
    pool = torch.tensor(experts, dtype=torch.int64)
    k = min(top_k, len(experts))
    pick = torch.rand(tokens, len(experts), generator=gen).argsort(1)[:, :k]
    ids = torch.full((tokens, top_k), -1, dtype=torch.int64)
    ids[:, :k] = pool[pick]
    ids[torch.rand(tokens, top_k, generator=gen) < drop] = -1
    return ids.to(torch.int32)


def ep_inputs(
    tokens,
    num_experts,
    top_k,
    hidden,
    gen,
    *,
    routing="random",
    expert_map=None,
    drop=0.1,
    dtype=torch.bfloat16,
    device="cpu",
):
    """Per rank: x [T_r, H] (values ~ N(0, 2)), expert ids [T_r, K], gate weights fp32 [T_r, K].

    routing: "random" (uniform over all experts, `drop` of the ids -1), "one_expert" (every
    token to expert E-1 only), "one_rank" (every token to experts of rank 0 only)."""
    xs, ids, ws = [], [], []
    for t in tokens:
        xs.append((torch.randn(t, hidden, generator=gen) * 2).to(dtype).to(device))
        if routing == "one_expert":
            i = torch.full((t, top_k), -1, dtype=torch.int32)
            i[:, 0] = num_experts - 1
        elif routing == "one_rank":
            i = routed_ids(t, top_k, expert_map.experts_of(0), gen)
        else:
            i = routed_ids(t, top_k, list(range(num_experts)), gen, drop)
        ids.append(i.to(device))
        ws.append(torch.rand(t, top_k, generator=gen).to(device))
    return xs, ids, ws


def stand_in_expert(rows: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """A row-wise stand-in for the expert MLP: (rows, dequantised when FP8) * 1.5 + 0.25 in bf16."""
    vals = rows.float() if scales is None else reference.dequantize_fp8(rows, scales, torch.float32)
    return (vals * 1.5 + 0.25).to(torch.bfloat16)


def check_dispatch(got, xs, ids, expert_map: ExpertMap, rank, msg, *, align=1, quantize=False, x_scales=None):
    """Rank `rank`'s dispatch result (out, out_scales, expert_offsets) equals the reference bit for bit."""
    out, out_scales, offsets = got[:3]
    exp_out, exp_scales, exp_offsets, _ = reference.ep_dispatch(
        [x.cpu() for x in xs],
        [i.cpu() for i in ids],
        expert_map.expert_rank.cpu(),
        rank,
        align=align,
        quantize=quantize,
        x_scales=None if x_scales is None else [s.cpu() for s in x_scales],
    )
    assert offsets.dtype == torch.int32 and offsets.tolist() == exp_offsets.tolist(), (
        f"{msg}: expert_offsets {offsets.tolist()} != {exp_offsets.tolist()}"
    )
    n = int(exp_offsets[-1])
    assert out.shape[0] >= n and out.dtype == exp_out.dtype, f"{msg}: out {tuple(out.shape)} {out.dtype}"
    assert_bitwise_equal(out[:n].cpu(), exp_out[:n], f"{msg}: rows")
    assert (out_scales is None) == (exp_scales is None), f"{msg}: scales present {out_scales is not None}"
    if exp_scales is not None:
        assert_bitwise_equal(out_scales[:n].cpu(), exp_scales[:n], f"{msg}: scales")


def check_combine(got, ys, ids, weights, expert_map: ExpertMap, rank, msg, *, align=1, shared_outputs=None):
    """Rank `rank`'s combine result equals reference.ep_combine bit for bit."""
    expected = reference.ep_combine(
        [y.cpu() for y in ys],
        [i.cpu() for i in ids],
        None if weights is None else [w.cpu() for w in weights],
        expert_map.expert_rank.cpu(),
        align=align,
        shared_outputs=None if shared_outputs is None else [s.cpu() for s in shared_outputs],
    )[rank]
    assert_bitwise_equal(got.cpu(), expected, f"{msg}: combine")
