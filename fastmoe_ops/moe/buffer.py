"""`Buffer`: expert-parallel dispatch and combine across the ranks of a `Group`.

Every call starts with one metadata handshake (validation, counts, FMO_COMM_TIMEOUT): one
small per-peer MPI exchange; except on the static path (transport='ipc' with
num_worst_tokens: fastmoe_ops.moe.static), whose kernels exchange the counts on the device
and report data-dependent errors from it (Buffer.check() on CUDA). Then the payload rows
move by the transport the Buffer picked at construction (fastmoe_ops.moe.transports, one
protocol):
  host (default): `mpi`, MPI transfers of host buffers: CPU tensors packed and summed on
       the CPU; CUDA tensors packed and summed by the kernels on their device and staged
       through pinned host buffers around MPI (or given to it as device buffers where
       every rank's MPI is CUDA-aware: FMO_MPI_CUDA_AWARE);
  ipc  (transport='ipc', ranks on one node): kernels on exactly the communication SM budget
       write rows straight into peers' buffers: CUDA tensors through CUDA IPC handles on the
       `cuda` engine; CPU tensors on the `sim` engine over POSIX shared memory. Tensors its
       buffers cannot serve (another device, fp64), and combine's backward, move over `mpi`.

    recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = buf.dispatch(x, topk_idx, topk_weights)
    out = buf.combine(y, handle)
    (recv_xq, recv_xs), ... = buf.dispatch(x, topk_idx, topk_weights, use_fp8=True)   # x quantised on the way
Decode batches (Buffer(..., transport='ipc', low_latency=True); fastmoe_ops.moe.low_latency):
    recv_x, masked_m, ll_handle = buf.low_latency_dispatch(x, topk_idx, topk_weights)   # masked layout, no host sync
    out = buf.low_latency_combine(y, ll_handle)

Shapes on rank r of R, E experts, rank r owning experts [r*E/R, (r+1)*E/R):
  x [T, H] bf16 | fp16 | fp32 | fp64, or the FP8 pair (xq [T, H] e4m3, xs [T, ceil(H/128)] fp32)
  topk_idx [T, k] int64 in [-1, E), topk_weights [T, k] fp32 (or None)
  recv_x [N, H] (N = num_worst_tokens rows when set), rows by source rank then source token
  recv_topk_idx [N, k] local expert or -1, recv_topk_weights [N, k] (0 elsewhere)
  tokens_per_expert [E/R] int64: (token, slot) pairs per local expert
  combine: y [N, H] -> out [T, H], the ascending-rank sum of every received copy of t.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..comm import Group
from ..errors import CommError, InputError
from . import autograd, host, kernels, static
from .handshake import COMBINE, DISPATCH, DISPATCH_BACKWARD, handshake
from .low_latency import LowLatency
from .static import StaticHandle
from .transports.ipc import IpcTransport, mapping_for
from .transports.mpi import MpiTransport, mpi_reads_device_memory
from .validate import SCALE_GROUP, combine_input, dispatch_error, ipc_device, same


@dataclass(frozen=True)
class Handle:
    """What combine (and the backward passes) need from one dispatch.

    send_src [S] int64: the source token of each sent row (rank-major segments);
    combine_index [T, R] int64: for each token and rank, its row in the combine receive
    buffer (which mirrors the send layout) or -1; counts per peer, in rows."""

    buffer_id: int
    num_tokens: int
    num_recv: int
    num_recv_rows: int            # rows of recv_x (num_worst_tokens when set, else num_recv)
    hidden: int
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    send_src: torch.Tensor
    combine_index: torch.Tensor
    counts: np.ndarray            # [R, R] int64 contiguous: rows from src (row) to dst (column), every rank's

    @property
    def device(self) -> torch.device:
        """Where the dispatch ran (its tensors' device): combine's y must be there too."""
        return self.combine_index.device


class Buffer:
    """Dispatch/combine across `group`: `Buffer(group, hidden=H, num_experts=E)`.

    num_worst_tokens > 0 fixes the received row count (static shapes): recv tensors have
    that many rows (padding rows: zeros, topk_idx -1) and a dispatch that would receive
    more raises InputError on every rank (with transport='ipc', tensors its kernels move:
    the static path, no host synchronisation; errors found on the device, raised at once on
    `sim`, by check() on CUDA: see fastmoe_ops.moe.static). Collective: every rank
    constructs it alike.
    transport='ipc' (ranks of one node) maps every rank's buffer in every rank: sized for
    max_tokens_per_rank tokens sent from one rank to another, k <= max_topk; `device` says
    where those buffers live: a CUDA device (CUDA IPC, for tensors on it), or the CPU (POSIX
    shared memory, for CPU tensors on the `sim` engine); default: the current CUDA device
    where CUDA and CuPy are available, else the CPU. Other tensors take the host transport.
    Owns a duplicate of the group's communicator (and the IPC buffers), freed by destroy()
    or on collection."""

    _next_id = 0

    def __init__(self, group: Group, *, hidden: int, num_experts: int, num_worst_tokens: int = 0,
                 transport: str = "host", max_tokens_per_rank: int = 0, max_topk: int = 8, device=None,
                 low_latency: bool = False):
        if not isinstance(group, Group):
            raise InputError(f"group: expected a fastmoe_ops.comm.Group, got {type(group).__name__}")
        for name, value, low in (("hidden", hidden, 1), ("num_experts", num_experts, 1), ("num_worst_tokens", num_worst_tokens, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name}: expected an int >= {low}, got {value!r}")
        if num_experts % group.size != 0:
            raise InputError(f"num_experts: expected a multiple of the group size {group.size} "
                             f"(each rank owns num_experts / ranks experts), got {num_experts}")
        if transport not in ("host", "ipc"):
            raise InputError(f"transport: expected 'host' or 'ipc', got {transport!r}")
        if transport == "ipc" and not (isinstance(max_tokens_per_rank, int) and max_tokens_per_rank >= 1
                                       and isinstance(max_topk, int) and max_topk >= 1):
            raise InputError(f"max_tokens_per_rank, max_topk: expected ints >= 1 with transport='ipc', "
                             f"got {max_tokens_per_rank!r}, {max_topk!r}")
        if low_latency.__class__ is not bool or (low_latency and transport != "ipc"):
            raise InputError(f"low_latency: expected a bool, True only with transport='ipc', got {low_latency!r} "
                             f"with transport={transport!r}")
        ipc_buffers_on = ipc_device(device) if transport == "ipc" else None
        names = ("hidden", "num_experts", "num_worst_tokens", "transport", "max_tokens_per_rank", "max_topk", "device type",
                 "low_latency")
        config = group.allgather((hidden, num_experts, num_worst_tokens, transport, max_tokens_per_rank, max_topk,
                                  ipc_buffers_on.type if ipc_buffers_on is not None else None, low_latency), "Buffer()")
        for i, name in enumerate(names):
            same([c[i] for c in config], f"Buffer({name})")
        self.rank, self.num_ranks = group.rank, group.size
        self.hidden, self.num_experts, self.num_worst_tokens = hidden, num_experts, num_worst_tokens
        self.num_local_experts = num_experts // group.size
        mpi_device_buffers = mpi_reads_device_memory(group)   # (before the Dup: a refusal leaves nothing to free)
        self.group = Group(group.comm.Dup())  # private message stream; its failures stay here
        self._mpi = MpiTransport(self.group, mpi_device_buffers)   # also every call the chosen transport cannot serve
        self._transport = self._mpi
        if transport == "ipc":
            self._transport = IpcTransport(self.group, hidden, max_tokens_per_rank, max_topk, mapping_for(ipc_buffers_on))
        Buffer._next_id += 1
        self.id = Buffer._next_id
        try:
            self._ll = LowLatency(self.group, self.id, hidden=hidden, num_experts=num_experts, max_tokens=max_tokens_per_rank,
                                  max_topk=max_topk, mapping=mapping_for(ipc_buffers_on)) if low_latency else None
        except BaseException:   # refused alike on every rank: free what was built
            _release(self.group, self._transport, self._mpi, None)
            raise
        self._finalizer = weakref.finalize(self, _release, self.group, self._transport, self._mpi, self._ll)

    def __repr__(self) -> str:
        return (f"Buffer(rank={self.rank}/{self.num_ranks}, hidden={self.hidden}, num_experts={self.num_experts}, "
                f"num_worst_tokens={self.num_worst_tokens}{', destroyed' if not self.alive else ''})")

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def destroy(self) -> None:
        """Free the communicator and datatypes (idempotent; also runs on collection)."""
        self._finalizer()

    # ------------------------------------------------------------------ public API
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None = None, *, use_fp8: bool = False):
        """Send each token once to every rank owning one of its experts.

        Returns (recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle);
        recv_x is a pair (recv_xq, recv_xs) when x is, or when use_fp8: x (bf16/fp16/fp32)
        is quantised per 1 x 128 group on the way (inside the ipc kernel; on mpi by
        quantize_per_token_group before sending), bit for bit quantise-then-dispatch.
        Differentiable in x and topk_weights: the backward is a combine (of x's gradient
        rows with use_fp8: autograd.DispatchFn)."""
        self._check_alive("dispatch")
        if isinstance(x, (tuple, list)):
            return self.exchange_dispatch(x, topk_idx, topk_weights, use_fp8)
        return autograd.DispatchFn.run(self, x, topk_idx, topk_weights, use_fp8)

    def combine(self, y: torch.Tensor, handle: Handle) -> torch.Tensor:
        """out [T, H]: for each source token, the ascending-rank sum of its received rows.
        Differentiable in y: the backward is a dispatch with the saved handle."""
        self._check_alive("combine")
        return autograd.CombineFn.run(self, y, handle)

    def low_latency_dispatch(self, x, topk_idx, topk_weights=None, *, use_fp8: bool = False,
                             return_recv_hook: bool = False):
        """Decode dispatch into the masked layout (see fastmoe_ops.moe.low_latency): returns
        (recv_x [E_l, R*M, H] or (xq, xs), masked_m [E_l] int32 on the device, handle[, hook])."""
        return self._low_latency("low_latency_dispatch").dispatch(x, topk_idx, topk_weights, use_fp8=use_fp8,
                                                                  return_recv_hook=return_recv_hook)

    def low_latency_combine(self, y, handle):
        """y [E_l, R*M, H] -> out [T, H]: each token's expert rows, weighted, summed in slot order."""
        return self._low_latency("low_latency_combine").combine(y, handle)

    def low_latency_check(self) -> None:
        """Raise CommTimeoutError if a low-latency kernel gave up waiting (synchronises)."""
        self._low_latency("low_latency_check").check()

    def check(self) -> None:
        """Raise what the static path's kernels found (fastmoe_ops.moe.static): InputError
        for out-of-range topk_idx or a max_tokens_per_rank / num_worst_tokens overflow on any
        rank, CommTimeoutError for a peer that never came. Synchronises the device on CUDA
        (the `sim` engine raises from the call itself). Nothing to report elsewhere."""
        self._check_alive("check")
        if self._transport is self._mpi:
            return
        if self._transport.device.type == "cuda":
            torch.cuda.synchronize(self._transport.device)
        self._transport.raise_static_errors("static dispatch/combine")

    def _low_latency(self, what: str) -> LowLatency:
        self._check_alive(what)
        if self._ll is None:
            raise InputError(f"{what}: expected a Buffer built with transport='ipc', low_latency=True")
        return self._ll

    # ------------------------------------------------------------------ validation
    def _check_alive(self, what: str) -> None:
        if not self.alive:
            raise CommError(f"{what}: this Buffer was destroyed")

    def _transport_for(self, tensor, error: str | None):
        """The Buffer's transport where it serves the tensor, else mpi (the handshake checks
        that every rank agrees)."""
        if error is None and self._transport.serves(tensor):
            return self._transport
        return self._mpi

    def _handshake(self, op: int, hidden: int, dtype, topk: int, has_weights: bool, error: str | None, counts,
                   rows):
        """Every rank's send counts [R, R] (fastmoe_ops.moe.handshake)."""
        self._transport.quiesce()   # our previous transport kernel is done before peers may write again
        return handshake(self.group, op, hidden=hidden, dtype=dtype, topk=topk, num_experts=self.num_experts,
                         has_weights=has_weights, error=error, counts=counts, rows=rows)

    # ------------------------------------------------------------------ dispatch
    def exchange_dispatch(self, x, topk_idx, topk_weights, use_fp8: bool = False):
        """dispatch without autograd (what autograd.DispatchFn records): same arguments
        and results."""
        if static.serves(self, x):
            return static.dispatch(self, x, topk_idx, topk_weights, use_fp8)
        fp8 = isinstance(x, (tuple, list))
        error = dispatch_error(x, topk_idx, topk_weights, fp8, use_fp8, self.hidden, self.num_experts)
        xq = x[0] if fp8 else x
        r, ranks, per = self.rank, self.num_ranks, self.num_local_experts
        # The rows sent are e4m3 with use_fp8, whichever rank quantises: a pair and use_fp8 mix.
        dtype = torch.float8_e4m3fn if use_fp8 is True else xq.dtype if isinstance(xq, torch.Tensor) else None
        k = topk_idx.shape[1] if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 else 0
        rows_by = self._transport_for(xq, error)
        on_device = error is None and host.packed_on_device(xq)   # tokens_per_expert by the layout kernel there
        lay = rows_by.layout(topk_idx, ranks, per) if error is None else None
        # Streams: x (or xq), [xs], topk_idx, [topk_weights]; received rows in receive order.
        payloads = [xq] + ([x[1]] if fp8 else [None] if use_fp8 else []) + [topk_idx] + ([topk_weights] if topk_weights is not None else [])
        matrix = self._handshake(DISPATCH, self.hidden, dtype, k, topk_weights is not None, error,
                                 lay.counts if lay is not None else None, rows_by)
        received = matrix.sum(0)
        if self.num_worst_tokens and int(received.max()) > self.num_worst_tokens:
            worst = int(received.argmax())
            raise InputError(f"dispatch: rank {worst} would receive {int(received[worst])} tokens, more than "
                             f"num_worst_tokens={self.num_worst_tokens}")
        num_recv = int(received[r])
        rows = self.num_worst_tokens or num_recv

        recvs = [torch.empty((rows,) + tuple(p.shape[1:]), dtype=p.dtype, device=xq.device) for p in payloads if p is not None]
        if use_fp8:   # x arrives as e4m3 rows and their scales (the quantisation makes payloads[1])
            recvs[:1] = [torch.empty(rows, self.hidden, dtype=torch.float8_e4m3fn, device=xq.device),
                         torch.empty(rows, -(-self.hidden // SCALE_GROUP), dtype=torch.float32, device=xq.device)]
        rows_by.dispatch(payloads, recvs, lay, matrix, use_fp8)
        recv_idx = recvs[-2] if topk_weights is not None else recvs[-1]
        if rows > num_recv:   # padding rows (num_worst_tokens)
            for out in recvs:
                out[num_recv:].view(torch.uint8).zero_()
            recv_idx[num_recv:] = -1
        # Received expert ids made local (-1: not this rank's), their weights (0 elsewhere),
        # and the (row, slot) count of each local expert.
        mine = (recv_idx >= r * per) & (recv_idx < (r + 1) * per)
        recv_topk_idx = torch.where(mine, recv_idx - r * per, -1)
        recv_w = torch.where(mine, recvs[-1], 0.0) if topk_weights is not None else None
        if on_device and rows:   # the layout kernel on the device (no atomics: deterministic)
            tokens_per_expert = kernels.bucket_layout(recv_topk_idx, per, 1, once=False)[0]
        else:
            tokens_per_expert = torch.bincount(recv_topk_idx[mine], minlength=per)
        handle = Handle(self.id, xq.shape[0], num_recv, rows, self.hidden, tuple(matrix[r].tolist()),
                        tuple(matrix[:, r].tolist()), lay.send_src, lay.combine_index, matrix)
        recv_x = autograd.Fp8Rows((recvs[0], recvs[1])) if fp8 or use_fp8 else recvs[0]
        if use_fp8:   # x's dtype and the rows' shape for consumers (autograd.Fp8Rows); no memory
            recv_x.grad_anchor = xq.new_zeros(()).expand(rows, self.hidden)
        return recv_x, recv_topk_idx, recv_w, tokens_per_expert, handle

    def exchange_combine_backward(self, g: torch.Tensor, handle: Handle) -> torch.Tensor:
        """Combine's backward (no autograd): g [T, H] -> [rows, H], each received row the
        source token's g."""
        self._check_handle(handle, "combine backward")
        if isinstance(handle, StaticHandle):
            return static.combine_backward(self, g, handle)
        self._handshake(DISPATCH_BACKWARD, g.shape[1], g.dtype, 0, False, None, np.zeros(self.num_ranks, np.int64),
                        self._mpi)
        return self._mpi.dispatch_rows(g, handle)

    # ------------------------------------------------------------------ combine
    def _check_handle(self, handle, what: str) -> None:
        if not isinstance(handle, (Handle, StaticHandle)):
            raise InputError(f"handle: expected the Handle from this Buffer's dispatch, got {type(handle).__name__}")
        if handle.buffer_id != self.id:
            raise InputError(f"handle: expected a Handle from this Buffer (id {self.id}), got one from Buffer {handle.buffer_id}")

    def exchange_combine(self, y: torch.Tensor, handle: Handle, any_width: bool = False) -> torch.Tensor:
        """combine without autograd (what autograd.CombineFn records); any_width: rows of any
        width (the topk-weight gradients), else the Buffer's hidden size."""
        error = None
        width = self.hidden if not any_width else (y.shape[1] if isinstance(y, torch.Tensor) and y.dim() == 2 else 0)
        if isinstance(handle, StaticHandle):   # local checks only: ranks with alike inputs refuse alike
            self._check_handle(handle, "combine")
            combine_input(y, handle, width)
            return static.combine(self, y, handle)
        try:
            self._check_handle(handle, "combine")   # refused in the handshake: no rank left waiting
            combine_input(y, handle, width)
        except InputError as e:
            error = str(e)
        dtype = y.dtype if isinstance(y, torch.Tensor) else None
        rows_by = self._transport_for(y, error)
        if error is None:
            y = y[: handle.num_recv].contiguous()
        self._handshake(COMBINE, width, dtype, 0, False, error, np.zeros(self.num_ranks, np.int64), rows_by)
        return rows_by.combine(y, handle)


def _release(group: Group, transport, mpi: MpiTransport, low_latency) -> None:
    if low_latency is not None:
        low_latency.close()
    mpi.close()
    transport.close()   # (mpi again when it is the chosen one: close is idempotent)
    group.free()
    try:
        from mpi4py import MPI

        if not MPI.Is_finalized():
            group.comm.Free()
    except Exception:  # interpreter shutdown
        pass
