"""Expert-parallel benchmark on one GPU, DeepSeek-V3 dims (H = 7168, E = 256, K = 8), 4096 tokens
per rank, routed by the DeepSeek-V3 router (sigmoid + bias, 8 groups keep 4, top-8) on random
logits and a random expert bias: uneven loads, at EP8 each token on at most 4 ranks.

Rows:
  layout    the source side but the row copy (token ranks, the expert and rank indexes, the meta
            and counts), W = 8, in a CUDA graph. Target <= 15 us (DeepEP's layout: about 50 us).
  pack      the row copy into the rank-major send block: each token read once (quantised 1x128 in
            the same pass for FP8), written once per destination rank. W = 8. Target >= 80% of copy.
  unpack    one receiving rank of a W = 8 loopback: the rows from 8 sources laid out expert-major
            (32 local experts). Target >= 80% of copy.
  W = 1     ExpertParallel.dispatch + combine over a real one-rank NCCL communicator (the host
            path: a count exchange, one host read, grouped send/recv) against permute + unpermute of
            the same tokens. Target <= 1.2x.
GB/s count the bytes a step must move: rows read and written (FP8: their scales too).
"""

import argparse

import torch
import torch.distributed as dist

import moe_kernels
from moe_kernels.distributed import ExpertMap, ExpertParallel, _ops, loopback, stages
from moe_kernels.presets import PRESETS
from moe_kernels.testing import measure_copy_tbps, report, time_cuda_graph_us, time_cuda_us
from moe_kernels.testing.distributed import free_port

FP8 = torch.float8_e4m3fn
HIDDEN, EXPERTS, TOP_K, TOKENS, RANKS = 7168, 256, 8, 4096, 8
TARGET_LAYOUT_US = 15.0
TARGET_COPY_PCT = 80.0
TARGET_W1_RATIO = 1.2


def routed(tokens, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, device="cuda", generator=gen)
    bias = torch.randn(EXPERTS, device="cuda", generator=gen) * 0.1
    preset = PRESETS["deepseek_v3"]
    weights, ids, _ = moe_kernels.router(logits, TOP_K, bias=bias, **preset.router_kwargs())
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
    return x, ids, weights


def gbps_row(step, dtype, us, nbytes, copy_tbps, **extra):
    gbps = nbytes / (us * 1e-6) / 1e9
    return {
        "step": step,
        "dtype": dtype,
        "us": us,
        "GB/s": gbps,
        "% of copy": 100 * gbps / (copy_tbps * 1e3),
        **extra,
    }


def bench_source_side(copy_tbps):
    emap = ExpertMap.build(EXPERTS, RANKS, device="cuda")
    x, ids, weights = routed(TOKENS, 0)
    empty = x.new_empty((TOKENS, 0))
    permute = torch.ops.moe_kernels.permute
    rank_ids = _ops.token_ranks(ids, emap.expert_rank, RANKS)
    n = TOKENS * TOP_K
    parts = {
        "layout": lambda: stages.plan_send(empty, ids, weights, emap),
        "  token ranks": lambda: _ops.token_ranks(ids, emap.expert_rank, RANKS),
        "  index over ranks": lambda: permute(empty, None, rank_ids, RANKS, 0, RANKS, 1, False, False, n),
        "  index over experts": lambda: permute(empty, None, ids, EXPERTS, 0, EXPERTS, 1, False, False, n),
    }
    rows = [{"step": name, "dtype": "-", "us": time_cuda_graph_us(fn)} for name, fn in parts.items()]
    plan = stages.plan_send(x, ids, weights, emap)
    sent = int(plan.send_counts[:, 0].sum())
    rows[0]["ranks per token"] = sent / TOKENS
    for quantize in (False, True):
        pack = lambda q=quantize: _ops.pack_rows(x, None, plan.send_row_map, q, False, TOKENS * RANKS)  # noqa: E731
        row_bytes = HIDDEN + HIDDEN // 128 * 4 if quantize else 2 * HIDDEN
        nbytes = TOKENS * HIDDEN * 2 + sent * row_bytes
        rows.append(
            gbps_row(
                "pack",
                "fp8" if quantize else "bf16",
                time_cuda_graph_us(pack, calls_per_graph=5),
                nbytes,
                copy_tbps,
            )
        )
    return rows


def bench_unpack(copy_tbps):
    emap = ExpertMap.build(EXPERTS, RANKS, device="cuda")
    rows = [bench_unpack_one(emap, quantize, copy_tbps) for quantize in (False, True)]
    torch.cuda.empty_cache()
    return rows


def bench_unpack_one(emap, quantize, copy_tbps):
    """Rank 0 of a W = 8 loopback: the rows all 8 sources send it, unpacked."""
    plans = [stages.plan_send(*routed(TOKENS, seed), emap, quantize=quantize) for seed in range(RANKS)]
    counts = torch.stack([p.send_counts for p in plans])[:, 0].contiguous()  # what rank 0 receives
    sizes = torch.stack([p.send_counts[:, 0] for p in plans]).cpu()
    blocks = [[p.send_x.view(torch.uint8), p.meta] + ([p.send_scales] if quantize else []) for p in plans]
    recv = loopback._exchange(blocks, sizes)[0]
    del plans, blocks
    recv_x = recv[0].view(FP8 if quantize else torch.bfloat16)
    scales = recv[2] if quantize else None
    num_local = emap.local_counts[0]
    out_rows = stages.padded_rows(counts.cpu(), num_local, 1)
    us = time_cuda_graph_us(
        lambda: _ops.unpack(recv_x, scales, recv[1], counts, num_local, 0, 1, out_rows), calls_per_graph=5
    )
    row_bytes = HIDDEN + HIDDEN // 128 * 4 if quantize else 2 * HIDDEN
    nbytes = (recv_x.shape[0] + out_rows) * row_bytes
    dtype = "fp8" if quantize else "bf16"
    return gbps_row("unpack", dtype, us, nbytes, copy_tbps, rows_in=recv_x.shape[0], rows_out=out_rows)


def bench_round_trip(ep, x, ids, weights, quantize, exact, transport):
    """dispatch + combine against permute + unpermute of the same tokens. Exact sizes read the
    counts on the host, so they are timed eagerly (both sides); fixed sizes (exact=False) have no
    host sync and are replayed from a CUDA graph (both sides)."""
    first = ep.dispatch(x, ids, weights, quantize=quantize, exact=exact)
    y = torch.randn(first.out.shape[0], HIDDEN, device="cuda").to(torch.bfloat16)
    local_rows = moe_kernels.permute(x, ids, EXPERTS).out.shape[0]
    y_local = y[:local_rows] if y.shape[0] >= local_rows else torch.randn(local_rows, HIDDEN, device="cuda")

    def ours():
        d = ep.dispatch(x, ids, weights, quantize=quantize, exact=exact)
        return ep.combine(y, d.handle)

    def local():
        p = moe_kernels.permute(x, ids, EXPERTS, quantize=quantize)
        return moe_kernels.unpermute(y_local, p.row_map, weights)

    timer = time_cuda_us if exact else (lambda fn: time_cuda_graph_us(fn, calls_per_graph=3, reps=10))
    us, us_local = timer(ours), timer(local)
    return {
        "step": f"W=1 dispatch+combine ({transport}, {'exact' if exact else 'fixed sizes, graph'})",
        "dtype": "fp8" if quantize else "bf16",
        "us": us,
        "permute+unpermute us": us_local,
        "x permute+unpermute": us / us_local,
    }


def bench_world_of_one(copy_tbps):
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            device_id=torch.device("cuda", torch.cuda.current_device()),
        )
    rows = []
    try:
        x, ids, weights = routed(TOKENS, 1)
        for transport in ("nccl", "nccl_device", "torch"):
            with ExpertParallel(
                None, EXPERTS, HIDDEN, max_tokens_per_rank=TOKENS, top_k=TOP_K, transport=transport
            ) as ep:
                for quantize in (False, True):
                    for exact in (True, False):
                        rows.append(bench_round_trip(ep, x, ids, weights, quantize, exact, transport))
    finally:
        torch.cuda.synchronize()
        if own_group:
            dist.destroy_process_group()
    return rows


def report_targets(rows):
    for r in rows:
        if r["step"] == "layout":
            ok, what = r["us"] <= TARGET_LAYOUT_US, f"<= {TARGET_LAYOUT_US:.0f} us"
        elif r["step"] in ("pack", "unpack"):
            ok, what = r["% of copy"] >= TARGET_COPY_PCT, f">= {TARGET_COPY_PCT:.0f}% of copy"
        elif "(nccl" in r["step"]:
            ok, what = r["x permute+unpermute"] <= TARGET_W1_RATIO, f"<= {TARGET_W1_RATIO}x permute+unpermute"
        else:
            continue
        print(f"  target {r['step']:<32} {r['dtype']:<4} {what:<28} {'met' if ok else 'MISSED'}")


def main(out_dir="bench/results", copy_tbps=None):
    copy_tbps = copy_tbps or measure_copy_tbps()
    rows = bench_source_side(copy_tbps) + bench_unpack(copy_tbps) + bench_world_of_one(copy_tbps)
    moe_kernels.check_device_errors()
    columns = ["step", "dtype", "us", "GB/s", "% of copy", "ranks per token", "rows_in", "rows_out"]
    columns += ["permute+unpermute us", "x permute+unpermute"]
    title = (
        f"Expert parallel, DeepSeek-V3 dims, {TOKENS} tokens per rank (copy {copy_tbps:.2f} TB/s measured)"
    )
    extra = {
        "copy_tbps": copy_tbps,
        "hidden": HIDDEN,
        "experts": EXPERTS,
        "top_k": TOP_K,
        "tokens_per_rank": TOKENS,
        "ranks": RANKS,
    }
    report(title, "ep", rows, columns, out_dir, ["x permute+unpermute"], extra)
    report_targets(rows)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results", help="folder for ep.json")
    main(parser.parse_args().out)
