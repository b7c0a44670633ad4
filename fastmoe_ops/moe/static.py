"""The static path of a Buffer: transport='ipc' with num_worst_tokens, every count on the device.

    buf = Buffer(group, hidden=H, num_experts=E, num_worst_tokens=N, transport="ipc", max_tokens_per_rank=M)
    recv_x, recv_topk_idx, recv_w, tokens_per_expert, handle = buf.dispatch(x, topk_idx, topk_weights)  # [N, ...]
    out = buf.combine(y, handle)
    buf.check()            # on CUDA: raise what the kernels found (synchronises)

No host synchronisation, no handshake, no MPI call: the layout kernel counts this rank's
rows per destination on the device, the dispatch kernel (csrc/moe/ipc_static.cuh) publishes
them into every peer's buffer with the rows, each receiver takes its offsets (a prefix over
source ranks) on the device and writes every one of the N rows (padding past the received
ones: zero rows, topk_idx -1, weight 0); the handle keeps the counts on the device for combine
(and for combine's backward, a static dispatch of the gradient rows). Fixed-shape calls are
capturable in a CUDA graph.

Contract. Host checks are local (shapes, dtypes, devices, k): ranks with alike inputs refuse
alike, as low_latency.py's do; every rank must make the same sequence of static calls, with
inputs alike in dtype, k and topk_weights given or not (a rank whose x takes another path,
say fp64 over MPI, leaves its peers' kernels to time out). What depends on the data is found
by the kernels on the device and reported, never a silent wrong answer:
  topk_idx ids outside [-1, E) on any rank, a rank sending one peer more than
  max_tokens_per_rank rows, a rank receiving more than num_worst_tokens rows: every rank's
  dispatch receives padding only, and InputError (naming the argument and the ranks) is
  raised on every rank alike; the Buffer stays usable;
  a peer that never arrives within FMO_COMM_TIMEOUT: CommTimeoutError naming it, and the
  Buffer is unusable.
On the `sim` engine the kernel is synchronous: the error is raised by the call itself. On
CUDA it is raised by `Buffer.check()` (which synchronises); until then every further
dispatch receives padding only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from . import autograd, kernels
from .validate import SCALE_GROUP, dispatch_error


@dataclass(frozen=True)
class StaticHandle:
    """What combine (and the backward passes) need from one static dispatch, on the device.

    send_pos [T, R] int64: each token's row in the destination's slot or -1;
    send_counts [R] int64: rows sent to each rank; combine_index [T, R] int64: each token's
    row in this rank's combine region (the rank-major send order) or -1; counts [R, R]
    int64: rows from src (row) to dst (column), every rank's (zeros after a refused dispatch)."""

    buffer_id: int
    num_tokens: int
    num_recv_rows: int            # rows of recv_x: num_worst_tokens
    hidden: int
    send_pos: torch.Tensor
    send_counts: torch.Tensor
    combine_index: torch.Tensor
    counts: torch.Tensor
    num_recv = None               # the received rows are known on the device only

    @property
    def device(self) -> torch.device:
        """Where the dispatch ran (its tensors' device): combine's y must be there too."""
        return self.combine_index.device


def serves(buffer, x) -> bool:
    """Whether a dispatch of x takes the static path: a Buffer with num_worst_tokens on ipc,
    x (or the pair's codes) a tensor its kernels move."""
    xq = x[0] if isinstance(x, (tuple, list)) and len(x) == 2 else x
    return (buffer.num_worst_tokens > 0 and buffer._transport is not buffer._mpi and isinstance(xq, torch.Tensor)
            and buffer._transport.serves(xq))


def dispatch(buffer, x, topk_idx, topk_weights, use_fp8: bool):
    """Buffer.exchange_dispatch on the static path: the same results, a StaticHandle."""
    fp8 = isinstance(x, (tuple, list))
    error = dispatch_error(x, topk_idx, topk_weights, fp8, use_fp8, buffer.hidden, buffer.num_experts,
                           check_range=False)
    if error is not None:
        raise InputError(error)
    ipc = buffer._transport
    xq = x[0] if fp8 else x
    dev, rows, r, ranks, per = xq.device, buffer.num_worst_tokens, buffer.rank, buffer.num_ranks, buffer.num_local_experts
    topk_idx = topk_idx.contiguous()
    send_counts, send_pos = kernels.bucket_layout(topk_idx, ranks, per, once=True)
    # Rows past a slot are never sent (the kernel reports the overflow): the combine rows
    # stay inside the combine region either way.
    capped = send_counts.clamp(max=ipc.slot_rows)
    first = torch.cumsum(capped, 0) - capped
    combine_index = torch.where((send_pos >= 0) & (send_pos < ipc.slot_rows), send_pos + first, -1)
    # Streams: x (or xq), [xs], topk_idx, [topk_weights]; received rows in receive order.
    payloads = [xq] + ([x[1]] if fp8 else [None] if use_fp8 else []) + [topk_idx] + ([topk_weights] if topk_weights is not None else [])
    recvs = [torch.empty((rows,) + tuple(p.shape[1:]), dtype=p.dtype, device=dev) for p in payloads if p is not None]
    if use_fp8:   # x arrives as e4m3 rows and their scales (the kernel quantises)
        recvs[:1] = [torch.empty(rows, buffer.hidden, dtype=torch.float8_e4m3fn, device=dev),
                     torch.empty(rows, -(-buffer.hidden // SCALE_GROUP), dtype=torch.float32, device=dev)]
    idx_stream = len(recvs) - (2 if topk_weights is not None else 1)
    matrix = torch.empty(ranks, ranks, dtype=torch.int64, device=dev)
    ipc.static_dispatch(payloads, recvs, send_pos, send_counts, matrix, topk_idx=topk_idx,
                        num_experts=buffer.num_experts, fill_stream=idx_stream, quantize=use_fp8)
    recv_idx = recvs[idx_stream]
    # Received expert ids made local (-1: not this rank's), their weights (0 elsewhere),
    # and the (row, slot) count of each local expert: tensor ops and the layout kernel.
    mine = (recv_idx >= r * per) & (recv_idx < (r + 1) * per)
    recv_topk_idx = torch.where(mine, recv_idx - r * per, -1)
    recv_w = torch.where(mine, recvs[-1], 0.0) if topk_weights is not None else None
    tokens_per_expert = kernels.bucket_layout(recv_topk_idx, per, 1, once=False)[0]
    handle = StaticHandle(buffer.id, xq.shape[0], rows, buffer.hidden, send_pos, send_counts, combine_index, matrix)
    recv_x = autograd.Fp8Rows((recvs[0], recvs[1])) if fp8 or use_fp8 else recvs[0]
    if use_fp8:   # x's dtype and the rows' shape for consumers (autograd.Fp8Rows); no memory
        recv_x.grad_anchor = xq.new_zeros(()).expand(rows, buffer.hidden)
    return recv_x, recv_topk_idx, recv_w, tokens_per_expert, handle


def combine(buffer, y: torch.Tensor, handle: StaticHandle) -> torch.Tensor:
    """Buffer.exchange_combine on the static path (y and handle already checked): y [N, W]."""
    if not buffer._transport.serves(y):
        raise InputError(f"y: expected a tensor the ipc kernels move (dtype in bf16, fp16, fp32 on "
                         f"{buffer._transport.device}) for a handle of the static path, got {y.dtype} on {y.device}")
    return buffer._transport.static_combine(y, handle.num_tokens, handle.combine_index, handle.counts)


def combine_backward(buffer, g: torch.Tensor, handle: StaticHandle) -> torch.Tensor:
    """Combine's backward on the static path: a static dispatch of g [T, W] with the saved
    layout -> [N, W], each received row its source token's g (padding rows zero)."""
    if not buffer._transport.serves(g):
        raise InputError(f"combine backward: expected a gradient the ipc kernels move, got {g.dtype} on {g.device}")
    out = torch.empty(handle.num_recv_rows, g.shape[1], dtype=g.dtype, device=g.device)
    matrix = torch.empty_like(handle.counts)
    buffer._transport.static_dispatch([g.contiguous()], [out], handle.send_pos, handle.send_counts, matrix)
    return out
