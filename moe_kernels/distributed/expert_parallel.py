"""ExpertParallel: dispatch tokens to the ranks that hold their experts, and combine the experts'
outputs back (ep-design.md §3), with autograd.

Contract (what every test checks): on rank r, dispatch returns exactly what
``permute`` gives for all ranks' tokens concatenated in rank order, keeping r's experts
(``reference.ep_dispatch``): rows by local expert, then source rank, then source pair; padded to
`align`; bit for bit, FP8 rows with their 1x128 scales. combine returns, per token, the sum over
the token's ranks in rank order (fp32) of each rank's partial sum (its rows weighted by the gate
weights, summed in k order in fp32 and rounded once), plus the shared output, rounded once
(``reference.ep_combine``): deterministic, bit-identical run to run.
"""

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_kernels._checks import FLOAT_DTYPES, FP8, check
from moe_kernels.distributed import _ops, stages
from moe_kernels.distributed.device_path import DeviceExchange, WindowLayout
from moe_kernels.distributed.expert_map import ExpertMap
from moe_kernels.distributed.transport import NcclTransport, TorchTransport, Transport
from moe_kernels.ops.device_error import raise_pending_device_error

TRANSPORTS = ("auto", "nccl", "nccl_device", "torch")


@dataclass
class EPHandle:
    """What combine (and the backward passes) need from a dispatch. Device tensors stay on the device."""

    num_tokens: int
    num_rows: int  # rows of the dispatch output (and of the y combine takes)
    send_row_map: torch.Tensor  # int32 [T, K]
    pair_slot: torch.Tensor  # int32 [T, K]
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    recv_row_map: torch.Tensor  # int32 [received, K] output row of each received token's entries
    recv_weights: torch.Tensor  # fp32 [received, K] their gate weights
    weights: torch.Tensor | None  # the gate weights dispatch was given (combine's autograd input)
    device_exchange: DeviceExchange | None = None  # the device path's end of this rank
    send_counts_dev: torch.Tensor | None = None  # int32 [W, 1 + L] sent, on the device (device path)
    recv_counts_dev: torch.Tensor | None = None  # int32 [W, 1 + L] received, on the device

    @classmethod
    def of(
        cls,
        plan,
        num_tokens,
        num_rows,
        unpacked,
        send_counts,
        recv_counts,
        weights,
        *,
        device_exchange=None,
        recv_counts_dev=None,
    ):
        """The handle of a dispatch: the source's plan, the receiver's unpack (out, out_scales,
        offsets, row_map, weights), the host row counts, and the device path's end if any."""
        return cls(
            num_tokens=num_tokens,
            num_rows=num_rows,
            send_row_map=plan.send_row_map,
            pair_slot=plan.pair_slot,
            send_counts=send_counts,
            recv_counts=recv_counts,
            recv_row_map=unpacked[3],
            recv_weights=unpacked[4],
            weights=weights,
            device_exchange=device_exchange,
            send_counts_dev=plan.send_counts if device_exchange is not None else None,
            recv_counts_dev=recv_counts_dev,
        )


class DispatchResult(NamedTuple):
    out: torch.Tensor  # [R, H] x's dtype, or float8_e4m3fn
    out_scales: torch.Tensor | None  # [R, H/128] fp32 when FP8
    expert_offsets: torch.Tensor  # int32 [L + 1] on the device
    handle: EPHandle


class ExpertParallel:
    """Expert parallelism over the ranks of a torch.distributed process group.

    Args:
        group: the process group (None: the default group). Its ranks hold the experts.
        num_experts: E, over all ranks. hidden_size: H of the tokens.
        max_tokens_per_rank: the most tokens any rank dispatches in one call (checked; sizes the
            output when exact=False).
        top_k: K, the experts per token.
        expert_to_rank: None (experts split evenly and contiguously) or E ranks, one per expert.
        transport: "nccl" (our own NCCL communicator, created here over `group`: needs CUDA;
            grouped ncclSend / ncclRecv), "nccl_device" (the same communicator's symmetric windows:
            rows stored straight into the other GPUs' memory over NVLink, no host step; every rank
            on one node; bfloat16, float16 or FP8 rows), "torch"
            (torch.distributed.all_to_all_single over `group`: the CPU path), or "auto" (nccl on
            CUDA, torch on CPU).
        device: where the tokens live (default: the current CUDA device, or CPU without CUDA).
        comm_side_stream: run dispatch and combine on a side stream of their own (CUDA). Each
            starts after `previous_event` (default: all work issued so far on the current
            stream) and the current stream waits for it at the end: record an event after the
            router, issue the shared experts, then dispatch(..., previous_event=event), and the
            shared experts overlap the dispatch.

    Every rank must construct it together (it is collective), with the same num_experts,
    hidden_size, top_k and expert map (checked). Free the communicator with close() or a with block.
    """

    def __init__(
        self,
        group,
        num_experts: int,
        hidden_size: int,
        *,
        max_tokens_per_rank: int,
        top_k: int,
        expert_to_rank=None,
        transport: str = "auto",
        device=None,
        comm_side_stream: bool = False,
    ):
        op = "ExpertParallel"
        check(
            dist.is_initialized(), op, "torch.distributed is not initialised: call init_process_group first"
        )
        check(transport in TRANSPORTS, op, f"transport must be one of {TRANSPORTS}, got {transport!r}")
        check(1 <= top_k <= 32, op, f"top_k must be in [1, 32], got {top_k}")
        check(max_tokens_per_rank >= 0, op, f"max_tokens_per_rank must be >= 0, got {max_tokens_per_rank}")
        self.group = group = dist.group.WORLD if group is None else group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if transport == "auto":
            transport = "nccl" if self.device.type == "cuda" else "torch"
        check(
            transport not in ("nccl", "nccl_device") or self.device.type == "cuda",
            op,
            f"transport {transport!r} needs a CUDA device, got {self.device}",
        )
        self.num_experts, self.hidden_size, self.top_k = num_experts, hidden_size, top_k
        self.max_tokens_per_rank = max_tokens_per_rank
        self.expert_map = ExpertMap.build(num_experts, self.world_size, expert_to_rank, self.device)
        self._check_agreement(transport)
        self.transport: Transport | None = (
            TorchTransport(group) if transport == "torch" else NcclTransport(group, self.device)
        )
        check(
            not comm_side_stream or self.device.type == "cuda",
            op,
            f"comm_side_stream needs a CUDA device, got {self.device}",
        )
        self.comm_stream = torch.cuda.Stream(self.device) if comm_side_stream else None
        self.device_exchange: DeviceExchange | None = None
        self._window = None
        if transport == "nccl_device":
            layout = WindowLayout.build(
                self.world_size,
                max(max_tokens_per_rank, 1),
                hidden_size,
                top_k,
                self.expert_map.rank_experts.shape[1] + 1,
            )
            comm = self.transport.comm
            self._window = torch.ops.moe_kernels.ep_nccl_window_create(comm, layout.bytes)
            self.device_exchange = DeviceExchange(
                layout,
                torch.ops.moe_kernels.ep_nccl_window_tensor(self._window),
                torch.ops.moe_kernels.ep_nccl_window_peers(self._window),
                self.rank,
            )

    def _check_agreement(self, transport: str) -> None:
        mine = (self.num_experts, self.hidden_size, self.top_k, transport, self.expert_map.as_list())
        every = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        names = ("num_experts", "hidden_size", "top_k", "transport", "expert_to_rank")
        for r, theirs in enumerate(every):
            for name, a, b in zip(names, mine, theirs, strict=True):
                check(
                    a == b,
                    "ExpertParallel",
                    f"ranks disagree on {name}: rank {self.rank} has {a}, rank {r} has {b}",
                )

    # -- properties ------------------------------------------------------------------------------
    @property
    def num_local_experts(self) -> int:
        return self.expert_map.local_counts[self.rank]

    @property
    def local_experts(self) -> list[int]:
        """This rank's experts, ascending global ids: local expert l is local_experts[l]."""
        return self.expert_map.experts_of(self.rank)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the windows and the communicator: collective (every rank closes together).
        Destroy CUDA graphs that captured its ops first (NCCL waits for them)."""
        if self._window is not None:
            self.device_exchange = None
            torch.ops.moe_kernels.ep_nccl_window_destroy(self._window)
            self._window = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live_transport(self) -> Transport:
        check(self.transport is not None, "ExpertParallel", "used after close()")
        return self.transport

    # -- dispatch --------------------------------------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        quantize: bool = False,
        pow2_scale: bool = False,
        x_scales: torch.Tensor | None = None,
        align: int = 1,
        exact: bool = True,
        previous_event: torch.cuda.Event | None = None,
    ) -> DispatchResult:
        """Send each token's row once to every rank that holds one of its experts, and lay the rows
        each rank receives out expert-major, ready for ``expert_mlp``.

        Args:
            x: [T, H] bfloat16, float16 or float32, or float8_e4m3fn with x_scales [T, H/128].
                T may be 0 (the rank still takes part, and nothing hangs).
            expert_ids: [T, K] int32 or int64 global ids, -1 = dropped.
            weights: [T, K] gate weights for combine (travel with the rows); None means 1.
            quantize: send e4m3 rows with 1x128 scales, quantised in the pack pass (H % 128 == 0).
            align: 1, 16, 64 or 128: each local expert's rows padded to a multiple (zero rows).
            exact: True: exact sizes: the host reads the counts (one sync), every exchange moves
                only real rows, and out has the rows received (padded). False: fixed sizes, no
                host sync, capturable in a CUDA graph: each rank's rows travel in a region of
                max_tokens_per_rank rows, and out has the rows of the bound (every rank's
                max_tokens_per_rank tokens to min(K, L) local experts); rows past
                expert_offsets[-1] are unspecified.
            previous_event: with comm_side_stream, what the side stream waits for before it
                starts (default: everything issued so far on the current stream).
        Returns:
            DispatchResult(out, out_scales, expert_offsets int32 [L + 1], handle for combine).

        Autograd: the gradient of x is the combine of the gradient of out with weights 1.
        """
        op = "dispatch"
        raise_pending_device_error()
        self._check_dispatch_args(x, expert_ids, weights, x_scales, quantize, align, op)
        fp8_out = quantize or x.dtype == FP8
        check(
            not (fp8_out and x.requires_grad),
            op,
            "FP8 rows are not differentiable: with quantize=True pass x.detach()",
        )
        if self.device_exchange is not None:
            self.device_exchange.check_rows(FP8 if quantize else x.dtype, op)
        kwargs = dict(quantize=quantize, pow2_scale=pow2_scale, x_scales=x_scales, align=align, exact=exact)
        with self._on_comm_stream(previous_event, (x, expert_ids, weights, x_scales)) as outputs:
            if torch.is_grad_enabled() and x.requires_grad:
                result = _Dispatch.apply(x, expert_ids, weights, self, kwargs)
            else:
                result = self._dispatch(x, expert_ids, weights, **kwargs)
            outputs += result[:3]
        return DispatchResult(*result)

    @contextlib.contextmanager
    def _on_comm_stream(self, previous_event, inputs):
        """Runs the block on the side stream (when there is one) after previous_event, then makes
        the current stream wait for it. The block appends the tensors it made to the yielded list;
        tensors crossing streams are recorded on the stream that uses them (caching allocator)."""
        outputs = []
        if self.comm_stream is None:
            yield outputs
            return
        current = torch.cuda.current_stream(self.device)
        if previous_event is None:
            self.comm_stream.wait_stream(current)
        else:
            self.comm_stream.wait_event(previous_event)
        for t in inputs:
            if t is not None:
                t.record_stream(self.comm_stream)
        with torch.cuda.stream(self.comm_stream):
            yield outputs
        current.wait_stream(self.comm_stream)
        for t in outputs:
            if t is not None:
                t.record_stream(current)

    def _check_dispatch_args(self, x, expert_ids, weights, x_scales, quantize, align, op):
        check(
            x.dim() == 2 and x.shape[1] == self.hidden_size,
            op,
            f"x must be [tokens, {self.hidden_size}], got {list(x.shape)}",
        )
        check(x.device == self.device, op, f"x must be on {self.device}, got {x.device}")
        check(
            x.dtype in (*FLOAT_DTYPES, FP8),
            op,
            f"x must be bfloat16, float16, float32 or float8_e4m3fn, got {x.dtype}",
        )
        check(
            expert_ids.dim() == 2 and expert_ids.shape == (x.shape[0], self.top_k),
            op,
            f"expert_ids must be [tokens, top_k] = [{x.shape[0]}, {self.top_k}], "
            f"got {list(expert_ids.shape)}",
        )
        check(
            expert_ids.device == self.device,
            op,
            f"expert_ids must be on {self.device}, got {expert_ids.device}",
        )
        check(
            x.shape[0] <= self.max_tokens_per_rank,
            op,
            f"{x.shape[0]} tokens exceed max_tokens_per_rank={self.max_tokens_per_rank}",
        )
        if weights is not None:
            check(
                weights.shape == expert_ids.shape and weights.device == self.device,
                op,
                f"weights must be [tokens, top_k] = {list(expert_ids.shape)} on {self.device}, "
                f"got {list(weights.shape)} on {weights.device}",
            )
        check(align in (1, 16, 64, 128), op, f"align must be one of (1, 16, 64, 128), got {align}")
        if x.dtype == FP8:
            check(x_scales is not None, op, "x is float8_e4m3fn: pass its 1x128 scales as x_scales")
            check(not quantize, op, "x is already FP8: quantize must be False")
        else:
            check(x_scales is None, op, "x_scales is only for float8_e4m3fn x")
        if quantize or x.dtype == FP8:
            check(
                self.hidden_size % 128 == 0,
                op,
                f"FP8 rows need hidden a multiple of 128, got {self.hidden_size}",
            )

    def _dispatch(self, x, expert_ids, weights, *, quantize, pow2_scale, x_scales, align, exact):
        transport = self._live_transport()
        w_detached = None if weights is None else weights.detach()
        # Fixed sizes: each rank's rows in a region of max_tokens_per_rank (a token goes to a rank
        # at most once, so it never overflows).
        fixed = not exact or self.device_exchange is not None
        capacity = max(self.max_tokens_per_rank, 1) if fixed else 0
        plan = stages.plan_send(
            x.detach(),
            expert_ids,
            w_detached,
            self.expert_map,
            quantize=quantize,
            pow2_scale=pow2_scale,
            x_scales=x_scales,
            capacity=capacity,
        )
        num_local = self.num_local_experts
        if self.device_exchange is not None:
            return self._dispatch_device(x, plan, weights, align, exact, capacity)
        recv_counts_dev = transport.exchange_counts(plan.send_counts)
        if exact:
            # The one device-to-host read of a dispatch: both count tables in one copy.
            counts = torch.stack([plan.send_counts, recv_counts_dev]).cpu()
            send_rows, recv_rows = counts[0, :, 0].tolist(), counts[1, :, 0].tolist()
            num_out_rows = stages.padded_rows(counts[1], num_local, align)
        else:
            send_rows = recv_rows = [capacity] * self.world_size
            num_out_rows = stages.rows_bound(self.world_size, capacity, self.top_k, num_local, align)
        sends = [plan.send_x, plan.meta] + ([plan.send_scales] if plan.send_scales is not None else [])
        received = transport.all_to_all(sends, send_rows, recv_rows)
        recv_x, recv_meta = received[0], received[1]
        recv_scales = received[2] if plan.send_scales is not None else None
        unpacked = _ops.unpack(
            recv_x, recv_scales, recv_meta, recv_counts_dev, num_local, capacity, align, num_out_rows
        )
        handle = EPHandle.of(plan, x.shape[0], num_out_rows, unpacked, send_rows, recv_rows, weights)
        return (*unpacked[:3], handle)

    def _dispatch_device(self, x, plan, weights, align, exact, capacity):
        exchange = self.device_exchange
        exchange.dispatch_send(plan)
        rows, scales, meta, recv_counts = exchange.dispatch_receive(plan.send_x.dtype)
        num_local = self.num_local_experts
        if exact:  # the one host read: the received counts, to size the output
            num_out_rows = stages.padded_rows(recv_counts.cpu(), num_local, align)
        else:
            num_out_rows = stages.rows_bound(self.world_size, capacity, self.top_k, num_local, align)
        unpacked = _ops.unpack(rows, scales, meta, recv_counts, num_local, capacity, align, num_out_rows)
        fixed = [capacity] * self.world_size
        handle = EPHandle.of(
            plan,
            x.shape[0],
            num_out_rows,
            unpacked,
            fixed,
            fixed,
            weights,
            device_exchange=exchange,
            recv_counts_dev=recv_counts,
        )
        return (*unpacked[:3], handle)

    # -- combine ---------------------------------------------------------------------------------
    def combine(
        self,
        y: torch.Tensor,
        handle: EPHandle,
        *,
        shared_output: torch.Tensor | None = None,
        previous_event: torch.cuda.Event | None = None,
    ) -> torch.Tensor:
        """Bring the experts' outputs back: [T, H] in y's dtype on the rank that dispatched.

        y: [R, H] bfloat16, float16 or float32, the expert outputs in the dispatch's layout (rows
        past expert_offsets[-1] are never read). shared_output: [T, H] (y's dtype), added in fp32.
        previous_event: as for dispatch, with comm_side_stream.
        Autograd: gradients for y, the dispatch's weights, and shared_output.
        """
        op = "combine"
        raise_pending_device_error()
        check(
            y.dim() == 2 and y.shape[0] == handle.num_rows and y.shape[1] == self.hidden_size,
            op,
            f"y must be [dispatch rows, hidden] = [{handle.num_rows}, {self.hidden_size}], "
            f"got {list(y.shape)}",
        )
        check(y.dtype in FLOAT_DTYPES, op, f"y must be bfloat16, float16 or float32, got {y.dtype}")
        if shared_output is not None:
            check(
                shared_output.shape == (handle.num_tokens, self.hidden_size)
                and shared_output.dtype == y.dtype,
                op,
                f"shared_output must be [{handle.num_tokens}, {self.hidden_size}] {y.dtype}, got "
                f"{list(shared_output.shape)} {shared_output.dtype}",
            )
        if handle.device_exchange is not None:
            check(
                y.dtype in (torch.bfloat16, torch.float16),
                op,
                f"the nccl_device transport combines bfloat16 or float16 y, got {y.dtype}",
            )
        inputs = (y, handle.weights, shared_output)
        with self._on_comm_stream(previous_event, inputs) as outputs:
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
                out = _Combine.apply(y, handle.weights, shared_output, self, handle)
            else:
                out = self._combine(y, handle, shared_output)
            outputs.append(out)
        return out

    def _combine(self, y, handle, shared_output, weighted=True):
        partials = stages.expert_partials(y, handle.recv_row_map, handle.recv_weights if weighted else None)
        if handle.device_exchange is not None:
            handle.device_exchange.combine_send(partials, handle.recv_counts_dev)
            back = handle.device_exchange.combine_receive(y.dtype)
            return stages.source_sum(back, handle.send_row_map, shared_output)
        (back,) = self._live_transport().all_to_all([partials], handle.recv_counts, handle.send_counts)
        return stages.source_sum(back, handle.send_row_map, shared_output)

    def _send_back_rows(self, grad_out: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """Combine's backward, dispatch direction: each token's gradient row to each of its ranks."""
        grad_send = stages.gather_send_rows(grad_out, handle.send_row_map, sum(handle.send_counts))
        if handle.device_exchange is not None:
            handle.device_exchange.rows_send(grad_send, handle.send_counts_dev)
            return handle.device_exchange.rows_receive(grad_send.dtype)
        (grad_partials,) = self._live_transport().all_to_all(
            [grad_send], handle.send_counts, handle.recv_counts
        )
        return grad_partials

    def _return_weight_grads(self, grad_recv_w: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """Combine's backward, combine direction: the gate weights' gradients [rows, K] fp32,
        computed where the rows went, back in the send block's layout."""
        if handle.device_exchange is not None:
            handle.device_exchange.wgrad_send(grad_recv_w, handle.recv_counts_dev)
            return handle.device_exchange.wgrad_receive()
        (back,) = self._live_transport().all_to_all([grad_recv_w], handle.recv_counts, handle.send_counts)
        return back


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_ids, weights, ep, kwargs):
        out, out_scales, offsets, handle = ep._dispatch(x, expert_ids, weights, **kwargs)
        ctx.ep, ctx.handle = ep, handle
        ctx.mark_non_differentiable(offsets)
        return out, out_scales, offsets, handle

    @staticmethod
    def backward(ctx, grad_out, *_):
        grad_x = ctx.ep._combine(grad_out.contiguous(), ctx.handle, None, weighted=False)
        return grad_x, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, shared_output, ep, handle):
        ctx.ep, ctx.handle = ep, handle
        ctx.weights_dtype = None if weights is None else weights.dtype
        ctx.save_for_backward(y)
        return ep._combine(y, handle, shared_output)

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        ep, handle = ctx.ep, ctx.handle
        needs_y, needs_w, needs_shared = ctx.needs_input_grad[:3]
        grad_y = grad_w = None
        grad_out = grad_out.contiguous()
        if needs_y or needs_w:
            grad_partials = ep._send_back_rows(grad_out, handle)
            grad_y, grad_recv_w = torch.ops.moe_kernels.unpermute_backward(
                grad_partials, handle.recv_row_map, handle.recv_weights, y if needs_w else None, y.shape[0]
            )
            if needs_w:
                back = ep._return_weight_grads(grad_recv_w, handle)
                flat = torch.cat([back.flatten(), back.new_zeros(1)])  # index -1 -> the zero at the end
                slot = handle.pair_slot.long()
                grad_w = flat[torch.where(slot >= 0, slot, flat.numel() - 1)].to(ctx.weights_dtype)
            grad_y = grad_y if needs_y else None
        return grad_y, grad_w, grad_out if needs_shared else None, None, None
