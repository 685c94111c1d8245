"""Expert-parallel dispatch / combine (moe_kernels.distributed), against reference.ep_dispatch /
ep_combine, bit for bit.

CPU: the local steps' references against plain loops; the loopback (W virtual ranks in one process)
over the CPU implementations; ExpertParallel on 2 gloo processes (transport "torch"), forward and
autograd. One GPU: each kernel against its reference; the loopback matrix; real NCCL at W = 1.
Two or more GPUs: ExpertParallel over NCCL on every GPU (skipped below 2).
"""

import pytest
import torch
import torch.distributed as dist
from conftest import requires_gpus, requires_sm90

from moe_kernels import MoE, RouterPreset, reference
from moe_kernels.distributed import ExpertMap, ExpertParallel, _ops, loopback, stages
from moe_kernels.ops.device_error import check_device_errors
from moe_kernels.testing import rel_error
from moe_kernels.testing.distributed import free_port, run_cases, run_ranks
from moe_kernels.testing.ep import (
    check_combine,
    check_dispatch,
    ep_inputs,
    stand_in_expert,
    uneven_expert_map,
)

FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------
# The local steps' references against plain loops (CPU)
# ------------------------------------------------------------------------------------------------


def test_token_ranks_reference_against_loops(gen):
    ids = torch.randint(-1, 16, (50, 6), generator=gen, dtype=torch.int32)
    expert_rank = torch.randint(0, 5, (16,), generator=gen, dtype=torch.int32)
    got = reference.ep_token_ranks(ids, expert_rank, 5)
    for t in range(50):
        ranks = sorted({int(expert_rank[e]) for e in ids[t].tolist() if e >= 0})
        assert got[t].tolist() == ranks + [-1] * (6 - len(ranks)), f"token {t}"


def test_token_ranks_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"ep_token_ranks: expert_ids must be in \[-1, 8\)"):
        reference.ep_token_ranks(torch.tensor([[0, 8]]), torch.zeros(8, dtype=torch.int32), 1)


def test_plan_send_meta_against_loops(gen):
    """Each send row carries, in k order, (local expert, eidx, weight) of its token's pairs on that rank."""
    emap = ExpertMap.build(12, 3, uneven_expert_map(12, 3, gen))
    xs, ids, ws = ep_inputs([40], 12, 4, 128, gen, drop=0.2)
    plan = stages.plan_send(xs[0], ids[0], ws[0], emap)
    seen = {e: 0 for e in range(12)}
    for t in range(40):
        for j, r in enumerate(plan.rank_ids[t].tolist()):
            if r < 0:
                continue
            row = int(plan.send_row_map[t, j])
            assert torch.equal(plan.send_x[row], xs[0][t]), f"{t=} {r=}: row"
            entries = [(k, e) for k, e in enumerate(ids[0][t].tolist()) if e >= 0 and emap.as_list()[e] == r]
            meta = plan.meta[row]
            for n, (k, e) in enumerate(entries):
                assert int(meta[0, n]) == emap.experts_of(r).index(e), f"{t=} {k=}: local expert"
                assert meta[2].view(torch.float32)[n].item() == ws[0][t, k].item(), f"{t=} {k=}: weight"
                assert int(plan.pair_slot[t, k]) == row * 4 + n, f"{t=} {k=}: pair slot"
            assert (meta[0, len(entries) :] == -1).all(), f"{t=}: unused entries"
        for k, e in enumerate(ids[0][t].tolist()):  # eidx: the pair's index among this source's pairs of e
            if e >= 0:
                row, n = divmod(int(plan.pair_slot[t, k]), 4)
                assert int(plan.meta[row, 1, n]) == seen[e], f"{t=} {k=}: eidx"
                seen[e] += 1
    counts = [[sum(1 for t in range(40) if r in plan.rank_ids[t].tolist())] for r in range(3)]
    for r in range(3):
        counts[r] += [seen[e] for e in emap.experts_of(r)] + [0] * (
            max(emap.local_counts) - emap.local_counts[r]
        )
    assert plan.send_counts.tolist() == counts


# ------------------------------------------------------------------------------------------------
# Loopback: W virtual ranks in one process (the CPU implementations here, the kernels on the GPU)
# ------------------------------------------------------------------------------------------------

# (name, W, E, K, tokens per rank, align, fp8, routing, expert map)
LOOPBACK_CASES = [
    ("w1_e8_k2", 1, 8, 2, [37], 1, False, "random", "even"),
    ("w2_e8_k1_rank1_empty", 2, 8, 1, [5, 0], 16, False, "random", "even"),
    ("w2_e64_k6_fp8", 2, 64, 6, [300, 123], 1, True, "random", "even"),
    ("w2_e8_k8_every_expert", 2, 8, 8, [33, 17], 1, False, "random", "even"),
    ("w3_e64_k6_uneven_map_align128", 3, 64, 6, [100, 0, 77], 128, False, "random", "uneven"),
    ("w3_e8_k2_fp8_uneven_map", 3, 8, 2, [9, 31, 2], 16, True, "random", "uneven"),
    ("w4_e256_k8_fp8_align16", 4, 256, 8, [256, 1, 300, 64], 16, True, "random", "even"),
    ("w4_e8_k2_one_expert", 4, 8, 2, [50, 20, 0, 7], 16, False, "one_expert", "even"),
    ("w4_e64_k8_one_rank_fp8", 4, 64, 8, [64, 64, 3, 90], 1, True, "one_rank", "even"),
    ("w8_e256_k8_align128", 8, 256, 8, [512, 0, 300, 77, 1, 256, 129, 40], 128, False, "random", "even"),
    ("w8_e256_k8_fp8_uneven_map", 8, 256, 8, [200, 100, 0, 0, 55, 256, 3, 128], 1, True, "random", "uneven"),
    ("w8_e64_k6_no_tokens", 8, 64, 6, [0] * 8, 16, False, "random", "even"),
    ("w8_e8_k1_one_rank", 8, 8, 1, [17] * 8, 1, False, "one_rank", "even"),
]
CPU_LOOPBACK = {"w1_e8_k2", "w2_e8_k1_rank1_empty", "w3_e8_k2_fp8_uneven_map", "w4_e8_k2_one_expert"}


def run_loopback_case(case, device, seed=0, fixed_sizes=False, device_path=False):
    name, w, e, k, tokens, align, fp8, routing, map_kind = case
    gen = torch.Generator().manual_seed(seed)
    emap = ExpertMap.build(e, w, uneven_expert_map(e, w, gen) if map_kind == "uneven" else None, device)
    hidden = 256
    xs, ids, ws = ep_inputs(
        tokens, e, k, hidden, gen, routing=routing, expert_map=emap, device=device, drop=0.15
    )
    capacity = max(tokens) + 3 if fixed_sizes or device_path else 0
    results = loopback.dispatch(
        xs, ids, ws, emap, quantize=fp8, align=align, capacity=capacity, device_path=device_path
    )
    for r in range(w):
        check_dispatch(results[r], xs, ids, emap, r, f"{name} rank {r}", align=align, quantize=fp8)
    ys = [stand_in_expert(out, scales) for out, scales, _, _ in results]
    shared = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16).to(device) for t in tokens]
    combined = loopback.combine(ys, [h for *_, h in results], shared)
    for r in range(w):
        check_combine(
            combined[r], ys, ids, ws, emap, r, f"{name} rank {r}", align=align, shared_outputs=shared
        )
    # Deterministic: a second run gives the same bytes.
    again = loopback.combine(ys, [h for *_, h in results], shared)
    for r in range(w):
        assert torch.equal(again[r].view(torch.int16), combined[r].view(torch.int16)), (
            f"{name} rank {r}: rerun"
        )


@pytest.mark.parametrize("case", [c for c in LOOPBACK_CASES if c[0] in CPU_LOOPBACK], ids=lambda c: c[0])
def test_loopback_cpu(case):
    run_loopback_case(case, "cpu")


@pytest.mark.parametrize("case", [c for c in LOOPBACK_CASES if c[0] in CPU_LOOPBACK], ids=lambda c: c[0])
def test_loopback_cpu_fixed_sizes(case):
    run_loopback_case(case, "cpu", fixed_sizes=True)


@requires_sm90
@pytest.mark.parametrize("mode", ["exact", "fixed_sizes", "device_path"])
@pytest.mark.parametrize("case", LOOPBACK_CASES, ids=lambda c: c[0])
def test_loopback_cuda(case, mode):
    run_loopback_case(case, "cuda", fixed_sizes=mode == "fixed_sizes", device_path=mode == "device_path")
    check_device_errors()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_sm90)])
def test_loopback_prequantized_rows(device, gen):
    """e4m3 tokens with their 1x128 scales move as they are (no requantisation), scales beside them."""
    w, e, k, tokens = 3, 12, 3, [20, 0, 9]
    emap = ExpertMap.build(e, w, None, device)
    xs, ids, ws = ep_inputs(tokens, e, k, 256, gen, device=device)
    quantized = [reference.quantize_fp8(x) for x in xs]
    qs, scales = [q for q, _ in quantized], [sc for _, sc in quantized]
    results = loopback.dispatch(qs, ids, ws, emap, x_scales=scales, align=16)
    for r in range(w):
        check_dispatch(results[r], qs, ids, emap, r, f"{device} rank {r}", align=16, x_scales=scales)


def graph_routings(tokens, e, k, gen):
    """Routings for successive replays of one captured graph: random, then every token on expert 0
    only, then every token on the last expert only (empty before)."""
    random = [ep_inputs([t], e, k, 256, gen, drop=0.1)[1][0] for t in tokens]
    first = [torch.full((t, k), -1, dtype=torch.int32) for t in tokens]
    last = [torch.full((t, k), -1, dtype=torch.int32) for t in tokens]
    for to_first, to_last in zip(first, last, strict=True):
        to_first[:, 0], to_last[:, 0] = 0, e - 1
    return [random, first, last]


@requires_sm90
@pytest.mark.parametrize("device_path", [False, True], ids=["fixed_sizes", "device_path"])
def test_loopback_graph_capture_and_replay(device_path, gen):
    """Fixed sizes need no host sync: dispatch -> stand-in experts -> combine of 4 virtual ranks,
    captured once, replayed with new tokens and new routings (an expert from 0 to every row)."""
    w, e, k, tokens = 4, 16, 4, [40, 0, 33, 17]
    emap = ExpertMap.build(e, w, None, "cuda")
    xs = [torch.zeros(t, 256, dtype=torch.bfloat16, device="cuda") for t in tokens]
    ids = [torch.zeros(t, k, dtype=torch.int32, device="cuda") for t in tokens]
    ws = [torch.zeros(t, k, device="cuda") for t in tokens]

    def step():
        results = loopback.dispatch(xs, ids, ws, emap, capacity=max(tokens), device_path=device_path)
        ys = [stand_in_expert(out, None) for out, *_ in results]
        return loopback.combine(ys, [r[3] for r in results]), [r[:3] for r in results], ys

    step()  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        combined, dispatched, ys = step()
    for replay, routing in enumerate(graph_routings(tokens, e, k, gen)):
        for r in range(w):
            xs[r].copy_(torch.randn(tokens[r], 256, generator=gen).to(torch.bfloat16))
            ids[r].copy_(routing[r])
            ws[r].copy_(torch.rand(tokens[r], k, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        for r in range(w):
            msg = f"replay {replay} rank {r}"
            check_dispatch(dispatched[r], xs, ids, emap, r, msg)
            check_combine(combined[r], ys, ids, ws, emap, r, msg)
    del graph
    check_device_errors()


# ------------------------------------------------------------------------------------------------
# The kernels against their CPU implementations (one GPU)
# ------------------------------------------------------------------------------------------------


@requires_sm90
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("w,e,k,t", [(1, 8, 2, 37), (4, 64, 6, 300), (8, 256, 8, 1000), (3, 9, 1, 0)])
def test_plan_send_kernels_match_reference(w, e, k, t, fp8, gen):
    emap_cpu = ExpertMap.build(e, w, uneven_expert_map(e, w, gen))
    emap_gpu = ExpertMap.build(e, w, emap_cpu.as_list(), "cuda")
    xs, ids, ws = ep_inputs([t], e, k, 256, gen, drop=0.2)
    cpu = stages.plan_send(xs[0], ids[0], ws[0], emap_cpu, quantize=fp8)
    gpu = stages.plan_send(xs[0].cuda(), ids[0].cuda(), ws[0].cuda(), emap_gpu, quantize=fp8)
    rows = int(cpu.send_counts[:, 0].sum())
    msg = f"{w=} {e=} {k=} {t=} {fp8=}"
    for name in ("rank_ids", "send_row_map", "pair_slot", "send_counts"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), f"{msg}: {name}"
    assert torch.equal(gpu.meta[:rows].cpu(), cpu.meta[:rows]), f"{msg}: meta"
    assert torch.equal(gpu.send_x[:rows].cpu().view(torch.uint8), cpu.send_x[:rows].view(torch.uint8)), (
        f"{msg}: rows"
    )
    if fp8:
        assert torch.equal(gpu.send_scales[:rows].cpu(), cpu.send_scales[:rows]), f"{msg}: scales"


@requires_sm90
def test_bad_ids_set_device_error():
    emap = ExpertMap.build(8, 2, None, "cuda")
    ids = torch.tensor([[0, 9], [1, -1]], dtype=torch.int32, device="cuda")
    x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="expert_ids had values outside"):
        stages.plan_send(x, ids, None, emap)
        check_device_errors()


def test_capacity_overflow_reference_raises():
    emap = ExpertMap.build(4, 2, None)
    ids = torch.zeros(5, 1, dtype=torch.int32)  # five tokens, all for rank 0
    with pytest.raises(ValueError, match="a rank gets more than capacity=2 rows"):
        stages.plan_send(torch.randn(5, 128).to(torch.bfloat16), ids, None, emap, capacity=2)


@requires_sm90
def test_capacity_overflow_sets_device_error():
    """More rows for a rank than its region holds: the rows past it are dropped (never written past
    the region) and the sticky flag says so."""
    emap = ExpertMap.build(4, 2, None, "cuda")
    ids = torch.zeros(5, 1, dtype=torch.int32, device="cuda")
    plan = stages.plan_send(
        torch.randn(5, 128, device="cuda").to(torch.bfloat16), ids, None, emap, capacity=2
    )
    assert plan.send_row_map[:, 0].tolist() == [0, 1, -1, -1, -1], plan.send_row_map[:, 0].tolist()
    with pytest.raises(RuntimeError, match="more rows than its fixed capacity"):
        check_device_errors()


@requires_sm90
def test_unpack_rejects_corrupt_meta():
    counts = torch.tensor([[1, 1, 0]], dtype=torch.int32, device="cuda")  # one row, one pair of expert 0
    meta = torch.tensor([[[0], [5], [0]]], dtype=torch.int32, device="cuda")  # eidx 5 >= count 1
    x = torch.randn(1, 128, device="cuda").to(torch.bfloat16)
    _ops.unpack(x, None, meta, counts, 2, 0, 1, 4)
    with pytest.raises(RuntimeError, match="dispatch: the received counts or meta"):
        check_device_errors()


# ------------------------------------------------------------------------------------------------
# ExpertParallel over a real process group: forward and autograd (every rank runs every case)
# ------------------------------------------------------------------------------------------------


def ep_forward_case(
    rank, world, *, device, transport, tokens, e, k, fp8=False, align=1, exact=True, side=False
):
    gen = torch.Generator().manual_seed(7)  # the same on every rank: every rank knows all inputs
    hidden = 256
    xs, ids, ws = ep_inputs(tokens, e, k, hidden, gen, drop=0.15, device=device)
    shared = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16).to(device) for t in tokens]
    with ExpertParallel(
        None,
        e,
        hidden,
        max_tokens_per_rank=max(tokens),
        top_k=k,
        transport=transport,
        device=device,
        comm_side_stream=side,
    ) as ep:
        # With a side stream: record the event the dispatch waits for, then issue other work on the
        # current stream (here: the shared output's copy), which the dispatch overlaps.
        event = torch.cuda.Event() if side else None
        if side:
            event.record()
        shared_here = shared[rank] * 1
        out, scales, offsets, handle = ep.dispatch(
            xs[rank], ids[rank], ws[rank], quantize=fp8, align=align, exact=exact, previous_event=event
        )
        msg = f"{transport} {device} rank {rank}/{world} {tokens=} {e=} {k=} {fp8=} {align=} {exact=}"
        check_dispatch((out, scales, offsets), xs, ids, ep.expert_map, rank, msg, align=align, quantize=fp8)
        # Every rank's y, from the reference dispatch (equal to ours, checked above on each rank).
        ys = []
        for r in range(world):
            ref_out, ref_scales, _, _ = reference.ep_dispatch(
                [x.cpu() for x in xs],
                [i.cpu() for i in ids],
                ep.expert_map.expert_rank.cpu(),
                r,
                align=align,
                quantize=fp8,
            )
            ys.append(stand_in_expert(ref_out, ref_scales))
        y = torch.zeros(out.shape[0], hidden, dtype=torch.bfloat16)
        n = min(out.shape[0], ys[rank].shape[0])  # both hold every row the offsets cover
        y[:n] = ys[rank][:n]
        combined = ep.combine(y.to(device), handle, shared_output=shared_here)
        check_combine(combined, ys, ids, ws, ep.expert_map, rank, msg, align=align, shared_outputs=shared)


def ep_autograd_case(rank, world, *, device, transport, tokens, e, k, dtype=torch.float32):
    """Gradients of x, the gate weights and shared_output through dispatch -> rows -> combine
    against autograd through the references of all ranks: fp32 (tight), or bf16 (the device path's
    rows; each bf16 rounding may differ by one ulp from the reference's)."""
    gen = torch.Generator().manual_seed(11)
    hidden = 128
    xs, ids, ws = ep_inputs(tokens, e, k, hidden, gen, drop=0.15, dtype=dtype)
    shared = [torch.randn(t, hidden, generator=gen).to(dtype) for t in tokens]
    grads_out = [torch.randn(t, hidden, generator=gen).to(dtype) for t in tokens]
    leaves = [[a.clone().requires_grad_() for a in group] for group in (xs, ws, shared)]
    emap = ExpertMap.build(e, world)
    ys = [reference.ep_dispatch(leaves[0], ids, emap.expert_rank, r)[0] * 1.5 + 0.25 for r in range(world)]
    expected = reference.ep_combine(ys, ids, leaves[1], emap.expert_rank, shared_outputs=leaves[2])
    torch.autograd.backward(expected, grads_out)

    x = xs[rank].to(device).requires_grad_()
    w = ws[rank].to(device).requires_grad_()
    s = shared[rank].to(device).requires_grad_()
    with ExpertParallel(
        None, e, hidden, max_tokens_per_rank=max(tokens), top_k=k, transport=transport, device=device
    ) as ep:
        out, _, _, handle = ep.dispatch(x, ids[rank].to(device), w)
        combined = ep.combine(out * 1.5 + 0.25, handle, shared_output=s)
        combined.backward(grads_out[rank].to(device))
    msg = f"{transport} {dtype} rank {rank}: "
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        combined.detach().cpu(), expected[rank].detach(), rtol=tol, atol=tol, msg=msg + "out"
    )
    for name, got, ref in (("x", x, leaves[0]), ("weights", w, leaves[1]), ("shared", s, leaves[2])):
        torch.testing.assert_close(
            got.grad.cpu().float(), ref[rank].grad.float(), rtol=tol, atol=tol, msg=msg + f"grad {name}"
        )


def ep_graph_case(rank, world, *, device, transport):
    """dispatch(exact=False) -> stand-in experts -> combine captured in a CUDA graph once, replayed
    with new tokens and routings; the graph is destroyed before the communicator."""
    gen = torch.Generator().manual_seed(5)
    e, k, hidden = 8 * world, 4, 256
    tokens = [24 + 8 * r for r in range(world)]
    x = torch.zeros(tokens[rank], hidden, dtype=torch.bfloat16, device=device)
    ids = torch.zeros(tokens[rank], k, dtype=torch.int32, device=device)
    w = torch.zeros(tokens[rank], k, device=device)
    with ExpertParallel(None, e, hidden, max_tokens_per_rank=max(tokens), top_k=k, transport=transport) as ep:

        def step():
            sent = ep.dispatch(x, ids, w, exact=False)
            y = stand_in_expert(sent.out, None)
            return ep.combine(y, sent.handle), sent

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            combined, sent = step()
        for replay, routing in enumerate(graph_routings(tokens, e, k, gen)):
            xs = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16) for t in tokens]
            ws = [torch.rand(t, k, generator=gen) for t in tokens]
            x.copy_(xs[rank])
            ids.copy_(routing[rank])
            w.copy_(ws[rank])
            graph.replay()
            torch.cuda.synchronize()
            msg = f"{transport} graph replay {replay} rank {rank}"
            check_dispatch(sent[:3], xs, routing, ep.expert_map, rank, msg)
            rank_of = ep.expert_map.expert_rank.cpu()
            ys = [
                stand_in_expert(reference.ep_dispatch(xs, routing, rank_of, r)[0], None) for r in range(world)
            ]
            check_combine(combined, ys, routing, ws, ep.expert_map, rank, msg)
        del graph


def ep_layer_case(rank, world, *, device, transport, fp8=False, train=False):
    """MoE with its experts spread over the ranks (expert_parallel=) against the same layer holding
    every expert. The routed sum is grouped by rank in one and by k in the other, each rounded to
    bf16 once, so they agree to bf16 rounding, not bit for bit."""
    hidden, e, k = 128, 4 * world, 2
    router = RouterPreset(num_experts=e, top_k=k, score_func="sigmoid", uses_bias=True)
    torch.manual_seed(3)  # the same full layer on every rank
    full = MoE(hidden, 128, router, shared_intermediate_size=128, device=device)
    with torch.no_grad():
        full.gate.e_score_correction_bias.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(4)
    tokens = [24 + 8 * r for r in range(world)]
    xs = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16).to(device) for t in tokens]
    with ExpertParallel(
        None, e, hidden, max_tokens_per_rank=max(tokens), top_k=k, transport=transport, device=device
    ) as ep:
        layer = MoE(hidden, 128, router, shared_intermediate_size=128, device=device, expert_parallel=ep)
        with torch.no_grad():
            layer.gate.load_state_dict(full.gate.state_dict())
            layer.shared_experts.load_state_dict(full.shared_experts.state_dict())
            mine = torch.tensor(ep.local_experts, device=device)
            layer.experts.gate_up_proj.copy_(full.experts.gate_up_proj[mine])
            layer.experts.down_proj.copy_(full.experts.down_proj[mine])
        if fp8:
            full.quantize_()
            layer.quantize_()
        msg = f"MoE over {transport} rank {rank}/{world} {fp8=} {train=}"
        if train:
            x_full, x_ep = (xs[rank].clone().requires_grad_() for _ in range(2))
            expected, got = full(x_full), layer(x_ep)
            expected.float().square().sum().backward()
            got.float().square().sum().backward()
            assert rel_error(x_ep.grad, x_full.grad) < 2e-2, (
                f"{msg}: grad x {rel_error(x_ep.grad, x_full.grad)}"
            )
        else:
            with torch.no_grad():
                expected, got = full(xs[rank]), layer(xs[rank])
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape, msg
        assert rel_error(got, expected) < 1e-2, f"{msg}: {rel_error(got, expected)}"


def ep_soak_case(rank, world, *, device, transport, steps=40):
    """Many calls on one ExpertParallel with random tokens per rank (0 included), alternating exact
    and fixed sizes and bf16 / FP8: no hang (the launcher's deadline), no device error, every 8th
    step checked against the references."""
    gen = torch.Generator().manual_seed(21)  # the same stream on every rank: all know all inputs
    e, k, hidden, most = 4 * world, 3, 256, 48
    with ExpertParallel(
        None, e, hidden, max_tokens_per_rank=most, top_k=k, transport=transport, device=device
    ) as ep:
        for step in range(steps):
            tokens = torch.randint(0, most + 1, (world,), generator=gen).tolist()
            tokens[step % world] = 0 if step % 5 == 0 else tokens[step % world]
            xs, ids, ws = ep_inputs(tokens, e, k, hidden, gen, drop=0.2, device=device)
            fp8, exact = device != "cpu" and step % 3 == 0, step % 2 == 0
            out, scales, offsets, handle = ep.dispatch(
                xs[rank], ids[rank], ws[rank], quantize=fp8, exact=exact
            )
            y = stand_in_expert(out, scales)
            combined = ep.combine(y, handle)
            if step % 8 == 0:
                msg = f"soak {transport} step {step} rank {rank} {tokens=} {fp8=} {exact=}"
                check_dispatch((out, scales, offsets), xs, ids, ep.expert_map, rank, msg, quantize=fp8)
                rank_of = ep.expert_map.expert_rank.cpu()
                xs_cpu, ids_cpu = [x.cpu() for x in xs], [i.cpu() for i in ids]
                ys = [
                    stand_in_expert(*reference.ep_dispatch(xs_cpu, ids_cpu, rank_of, r, quantize=fp8)[:2])
                    for r in range(world)
                ]
                check_combine(combined, ys, ids, ws, ep.expert_map, rank, msg)
        if device != "cpu":
            check_device_errors()


def ep_cases(device, transport, world):
    uneven = [37 + 13 * r for r in range(world)]
    with_empty = [0 if r == world - 1 else 20 + r for r in range(world)]

    def case(**kw):
        return lambda rank, world_size: ep_forward_case(
            rank, world_size, device=device, transport=transport, **kw
        )

    cases = {
        "bf16_uneven": case(tokens=uneven, e=8 * world, k=2),
        "bf16_rank_without_tokens_align16": case(tokens=with_empty, e=8 * world, k=3, align=16),
        "bf16_not_exact": case(tokens=uneven, e=4 * world, k=2, exact=False),
        "autograd": lambda rank, w: ep_autograd_case(
            rank, w, device=device, transport=transport, tokens=uneven, e=4 * world, k=2
        ),
        "autograd_bf16": lambda rank, w: ep_autograd_case(
            rank, w, device=device, transport=transport, tokens=uneven, e=4 * world, k=2, dtype=torch.bfloat16
        ),
    }
    cases["soak"] = lambda rank, w: ep_soak_case(rank, w, device=device, transport=transport)
    cases["moe_layer"] = lambda rank, w: ep_layer_case(rank, w, device=device, transport=transport)
    cases["moe_layer_train"] = lambda rank, w: ep_layer_case(
        rank, w, device=device, transport=transport, train=True
    )
    cases["moe_layer_fp8"] = lambda rank, w: ep_layer_case(
        rank, w, device=device, transport=transport, fp8=True
    )
    if device != "cpu":
        cases["fp8_align128"] = case(tokens=uneven, e=16 * world, k=6, fp8=True, align=128)
        cases["fp8_not_exact"] = case(tokens=with_empty, e=16 * world, k=6, fp8=True, align=16, exact=False)
        cases["graph_capture"] = lambda rank, w: ep_graph_case(rank, w, device=device, transport=transport)
        cases["side_stream"] = case(tokens=uneven, e=8 * world, k=2, side=True)
    if transport == "nccl_device":
        cases.pop("autograd")  # the device path moves 2-byte or FP8 rows: fp32 raises (argument test)
    return cases


def _gloo_worker(rank, world):
    return run_cases(ep_cases("cpu", "torch", world), rank, world)


@pytest.fixture(scope="module")
def gloo_results():
    return run_ranks(_gloo_worker, 2, backend="gloo", timeout_s=240)


@pytest.mark.parametrize("name", list(ep_cases("cpu", "torch", 2)))
def test_expert_parallel_gloo_two_ranks(name, gloo_results):
    failures, exit_codes = gloo_results
    assert exit_codes == [0, 0], f"{name}: exit codes {exit_codes}; {failures.get('setup')}"
    assert "setup" not in failures, "\n".join(failures["setup"])
    assert name not in failures, "\n".join(failures[name])


@pytest.fixture(scope="module")
def nccl_world_of_one():
    """A one-rank NCCL process group in this process (NCCL refuses two ranks on one GPU)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    yield
    dist.destroy_process_group()


@requires_sm90
@pytest.mark.parametrize("transport", ["nccl", "nccl_device", "torch"])
@pytest.mark.parametrize("name", list(ep_cases("cuda", "nccl", 1)))
def test_expert_parallel_one_gpu(name, transport, nccl_world_of_one):
    cases = ep_cases("cuda", transport, 1)
    if name not in cases:
        pytest.skip(f"{name} does not apply to the {transport} transport")
    cases[name](0, 1)
    check_device_errors()


@requires_sm90
def test_expert_parallel_checks_arguments(nccl_world_of_one):
    with ExpertParallel(None, 8, 128, max_tokens_per_rank=4, top_k=2) as ep:
        x = torch.randn(5, 128, device="cuda").to(torch.bfloat16)
        ids = torch.zeros(5, 2, dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="5 tokens exceed max_tokens_per_rank=4"):
            ep.dispatch(x, ids)
        with pytest.raises(ValueError, match=r"expert_ids must be \[tokens, top_k\] = \[4, 2\]"):
            ep.dispatch(x[:4], ids)
        with pytest.raises(ValueError, match="align must be one of"):
            ep.dispatch(x[:4], ids[:4], align=3)
        with pytest.raises(ValueError, match="x is float8_e4m3fn: pass its 1x128 scales"):
            ep.dispatch(x[:4].to(FP8), ids[:4])
        with pytest.raises(ValueError, match="x_scales is only for float8_e4m3fn x"):
            ep.dispatch(x[:4], ids[:4], x_scales=torch.ones(4, 1, device="cuda"))
        with pytest.raises(ValueError, match="FP8 rows are not differentiable"):
            ep.dispatch(x[:4].float().requires_grad_(), ids[:4], quantize=True)
    with ExpertParallel(None, 8, 128, max_tokens_per_rank=4, top_k=2, transport="nccl_device") as ep:
        with pytest.raises(ValueError, match="moves bfloat16, float16 or float8_e4m3fn rows"):
            ep.dispatch(x[:4].float(), ids[:4])
    with pytest.raises(ValueError, match="used after close"):
        ep.dispatch(x[:4], ids[:4])
    with pytest.raises(ValueError, match="expert_to_rank must name a rank for each of the 8 experts, got 7"):
        ExpertParallel(None, 8, 128, max_tokens_per_rank=4, top_k=2, expert_to_rank=[0] * 7)
    with pytest.raises(ValueError, match="transport must be one of"):
        ExpertParallel(None, 8, 128, max_tokens_per_rank=4, top_k=2, transport="nvlink")


def _nccl_worker(rank, world):
    return run_cases(ep_cases("cuda", "nccl", world), rank, world)


@requires_gpus(2)
@requires_sm90
@pytest.mark.parametrize("name", list(ep_cases("cuda", "nccl", 2)))
def test_expert_parallel_nccl_every_gpu(name):
    world = torch.cuda.device_count()
    failures, exit_codes = _nccl_results(world)
    assert exit_codes == [0] * world, f"{name}: exit codes {exit_codes}; {failures.get('setup')}"
    assert "setup" not in failures, "\n".join(failures["setup"])
    assert name not in failures, "\n".join(failures[name])


_NCCL_RESULTS = {}


def _nccl_results(world):
    if world not in _NCCL_RESULTS:
        _NCCL_RESULTS[world] = run_ranks(_nccl_worker, world, backend="nccl", timeout_s=300)
    return _NCCL_RESULTS[world]
