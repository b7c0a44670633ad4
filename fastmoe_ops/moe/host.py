"""The host transport: row payloads over MPI on host buffers.

Rows move in rank-major segments, so the layouts that make it cheap are the ones the
Buffer's semantics already fix:
  dispatch: the receive order (source rank, then source token) *is* recv_x's row order, so
            MPI receives straight into recv_x (and each extra: FP8 scales, topk ids,
            weights, into its own output); the send side is one row gather per payload
            (index_select into a reused send buffer).
  combine:  the send order is y's row order, so y goes out as it is; the rows come back in
            this rank's dispatch send order (rank-major segments) into a reused buffer, and
            the sum adds the segments in ascending rank order (index_add_ of one segment
            at a time: each touches a token once): the fixed order, bit for bit the
            kernels' sum.
CPU tensors move as per-peer Isend/Irecv (Group.start_rows), and this rank's own segment
never crosses MPI: dispatch gathers it straight into place, combine's sum reads it in y.
Large work buffers are kept per Buffer and reused: a fresh multi-megabyte allocation costs
more in page faults than the copy into it.

Where the rows live decides who packs them (`Packing`):
  host:   CPU tensors: index_select and the index_add_ sum on the CPU, no kernel (the
          CPU path, whatever the engine);
  staged: CUDA tensors: the layout, row gather and fixed-order sum run as the kernels of
          csrc/moe/ on the device; rows cross to pinned host buffers and back around MPI.
          `packed_on_device` decides; tests force it on CPU tensors, where the "device" is the
          CPU, the kernels run on the simulator and the staging copies are host copies.
          Staged rows go through one MPI Ialltoallv per payload (own segment included).
          With a CUDA-aware MPI (`device_buffers`, see transports.mpi) the packed device
          rows go to that Ialltoallv as they are and arrive in device buffers: no pinned
          copies either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..comm import Group
from ..reference.moe import acc_dtype
from . import kernels

# Dtypes the device's fixed-order gather-reduce kernel sums (fp64 sums on the host).
_KERNEL_SUM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def packed_on_device(t: torch.Tensor) -> bool:
    """Whether rows of `t` are packed on their device and staged through host buffers."""
    return t.device.type == "cuda"


@dataclass
class Layout:
    """Where this rank's tokens go. counts [R] int64 (numpy): tokens sent to each rank;
    pos [T, R]: the token's row among those sent to r (ascending token) or -1;
    combine_index [T, R]: its row in the rank-major send order or -1; send_src [S]: the
    source token of each send row (S = counts.sum())."""

    counts: np.ndarray
    pos: torch.Tensor
    combine_index: torch.Tensor
    send_src: torch.Tensor


def layout(topk_idx: torch.Tensor, ranks: int, per: int, on_device: bool) -> Layout:
    """Bucket each token once per destination rank (expert // per); on_device: by the
    layout kernel where topk_idx lives (CUDA tensors, or the staged path's tests); else
    by PyTorch ops on the CPU."""
    t = topk_idx.shape[0]
    if on_device and t:   # the layout kernel on the device, then the send order from its positions
        counts, pos = kernels.bucket_layout(topk_idx, ranks, per, once=True)
        host_counts = counts.cpu().numpy()   # the one host read: the handshake sends the counts anyway
        offsets = torch.zeros(ranks, dtype=torch.int64, device=pos.device)
        offsets[1:] = torch.cumsum(counts, 0)[:-1]
        combine_index = torch.where(pos >= 0, pos + offsets, -1)
        send_src = torch.empty(int(host_counts.sum()), dtype=torch.int64, device=pos.device)
        sent = combine_index >= 0
        send_src[combine_index[sent]] = torch.arange(t, dtype=torch.int64, device=pos.device)[:, None].expand(t, ranks)[sent]
        return Layout(host_counts, pos, combine_index, send_src)
    if on_device:   # no tokens: nothing for a kernel to do
        lay = layout(topk_idx.cpu(), ranks, per, False)
        return Layout(lay.counts, *(v.to(topk_idx.device) for v in (lay.pos, lay.combine_index, lay.send_src)))
    dest = torch.where(topk_idx >= 0, topk_idx.div(per, rounding_mode="floor"), ranks)
    hit = torch.zeros(ranks + 1, t, dtype=torch.bool)
    hit.scatter_(0, dest.t(), True)                                 # [R + 1, T]: token t goes to rank r
    hit = hit[:ranks]
    # Boolean indexing walks [R, T] row-major: rank-major, ascending token = the send order.
    send_src = hit.nonzero()[:, 1].contiguous()
    order = torch.full((ranks, t), -1, dtype=torch.int64)
    order[hit] = torch.arange(send_src.shape[0], dtype=torch.int64)
    counts = hit.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.where(order >= 0, order - offsets[:, None], -1)
    return Layout(counts.numpy(), pos.t().contiguous(), order.t().contiguous(), send_src)


def offsets(counts) -> list[int]:
    """Each rank's first row in rank-major segments of `counts` rows."""
    out, at = [], 0
    for c in counts:
        out.append(at)
        at += int(c)
    return out


def rows_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, row_bytes] uint8 view of a tensor's rows (contiguous first if need be)."""
    t = t if t.is_contiguous() else t.contiguous()
    return t.view(torch.uint8).view(t.shape[0], row_bytes(t))


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row of t [n, ...] (known even when n = 0)."""
    return math.prod(t.shape[1:]) * t.element_size()


class HostTransport:
    """The exchanges of one Buffer over its private Group, with its reused work buffers."""

    def __init__(self, group: Group, device_buffers: bool = False):
        self.group = group
        self.device_buffers = device_buffers   # staged rows: MPI reads and writes device memory
        self._work: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, tuple] = {}   # (name, shape, dtype, pinned) -> (buffer, its key, view of it)
        self.peers = [p for p in range(group.size) if p != group.rank]

    def work(self, name: str, shape, dtype: torch.dtype, pinned: bool = False) -> torch.Tensor:
        """A reused buffer (grown, never shrunk) viewed as `shape` of `dtype`."""
        key = (name, tuple(shape), dtype, pinned)
        hit = self._views.get(key)
        if hit is not None and hit[0] is self._work.get(hit[1]):   # the same view as last call (steady state)
            return hit[2]
        nbytes = math.prod(shape) * dtype.itemsize
        buf_key = f"{name} (pinned)" if pinned else name
        buf = self._work.get(buf_key)
        if buf is None or buf.numel() < nbytes:
            size = max(nbytes, 2 * buf.numel() if buf is not None else 0, 64)
            # Pinned: device copies run at full bandwidth, straight from/into MPI's buffers.
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=pinned and torch.cuda.is_available())
            self._work[buf_key] = buf
        view = buf[:nbytes].view(dtype).view(shape)
        if len(self._views) > 64:
            self._views.clear()
        self._views[key] = (buf, buf_key, view)
        return view

    def release(self) -> None:
        self._work.clear()
        self._views.clear()

    # ------------------------------------------------------------------ exchanges
    def _wait(self, pending) -> None:
        self.group.wait(pending, peers_hint=self.peers)

    def send_rows(self, name: str, src: torch.Tensor, send_src: torch.Tensor) -> torch.Tensor:
        """Staged: src [T, ...] (device) -> [S, row_bytes] uint8, row i = src[send_src[i]]:
        in pinned host memory, or where src is with device_buffers."""
        rows = rows_bytes(src)
        if send_src.shape[0] == 0:
            if self.device_buffers:
                return rows.new_empty((0, rows.shape[1]))
            return self.work(name, (0, rows.shape[1]), torch.uint8, pinned=True)
        packed = rows_bytes(kernels.gather_rows(rows, send_src))   # the gather kernel on the device
        if self.device_buffers:
            return packed
        host = self.work(name, packed.shape, torch.uint8, pinned=True)
        host.copy_(packed)
        return host

    def _device_ready(self, t: torch.Tensor) -> None:
        """Before MPI reads device rows: the kernels that wrote them (on the current stream)
        have finished, since MPI does not order itself after a CUDA stream. The stream, not the
        device: a device-wide sync would also wait for compute on other streams, which the
        overlapped MoE step runs beside communication."""
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()

    def dispatch_rows(self, srcs, send_src: torch.Tensor, send_counts, recv_counts, outs, what: str,
                      staged: bool) -> None:
        """srcs[i] [T, ...] -> outs[i] [rows, ...]: the first sum(recv_counts) rows of outs[i]
        receive, rank-major, the rows srcs[i][send_src] every rank sends here. All streams in
        flight at once. Host tensors: per-peer messages from one gather per stream, received
        straight into outs (rows are in receive order already); this rank's own segment
        never crosses MPI: it is gathered straight into place while the peers' rows are in
        flight."""
        n = int(sum(recv_counts))
        if staged:   # gather on the device, exchange pinned host rows (or the device rows), then into outs
            sends = [self.send_rows(f"{what} send {i}", src, send_src) for i, src in enumerate(srcs)]
            if self.device_buffers:   # MPI receives straight into the outputs (their first n rows)
                targets = [rows_bytes(out)[:n] for out in outs]
                self._device_ready(sends[0])
            else:
                targets = [self.work(f"{what} recv {i}", (n, s.shape[1]), torch.uint8, pinned=True) for i, s in enumerate(sends)]
            self._wait([self.group.ialltoallv(s, send_counts, t, recv_counts, f"{what} {i}")
                        for i, (s, t) in enumerate(zip(sends, targets))])
            if not self.device_buffers:
                for t, out in zip(targets, outs):
                    rows_bytes(out)[:n].copy_(t)
            return
        me, peers = self.group.rank, self.peers
        sd, rd = offsets(send_counts), offsets(recv_counts)
        mine = slice(sd[me], sd[me] + send_counts[me])
        sends = [(p, sd[p], send_counts[p]) for p in peers]
        recvs = [(p, rd[p], recv_counts[p]) for p in peers]
        rows = [rows_bytes(src) for src in srcs]
        targets = [rows_bytes(out)[:n] for out in outs]
        streams = []
        for i, (src, target) in enumerate(zip(rows, targets)):
            # One gather into a reused buffer: measured faster here (Open MPI 5, 4 ranks on
            # 2 cores) than sending the rows in place through MPI indexed datatypes.
            packed = self.work(f"{what} send {i}", (send_src.shape[0], src.shape[1]), torch.uint8)
            torch.index_select(src, 0, send_src[: mine.start], out=packed[: mine.start])   # (own segment left out)
            torch.index_select(src, 0, send_src[mine.stop:], out=packed[mine.stop:])
            streams.append((packed, sends, target, recvs))
        pending = self.group.start_rows(streams, what)
        for src, target in zip(rows, targets):
            torch.index_select(src, 0, send_src[mine], out=target[rd[me]: rd[me] + send_counts[me]])
        self.group.wait_rows(pending)

    def combine(self, y: torch.Tensor, layout_send_src: torch.Tensor, combine_index: torch.Tensor,
                send_counts, recv_counts, num_tokens: int, staged: bool) -> torch.Tensor:
        """y [N, W] received rows -> out [T, W]: each token's returned rows summed in ascending
        rank order in fp32 (fp64 for fp64), from zero, rounded once."""
        width, dtype = y.shape[1], y.dtype
        s = int(sum(send_counts))
        rows = rows_bytes(y)
        if staged:
            if self.device_buffers:   # y's rows go out as they are; the rows come back on the device
                outgoing = rows
                back = rows.new_empty((s, rows.shape[1]))
                self._device_ready(rows)
            else:
                outgoing = self.work("combine send", rows.shape, torch.uint8, pinned=True)
                outgoing.copy_(rows)
                back = self.work("combine back", (s, rows.shape[1]), torch.uint8, pinned=True)
            self._wait([self.group.ialltoallv(outgoing, recv_counts, back, send_counts, "combine payload")])
            back = back.view(dtype).view(s, width)
            if dtype in _KERNEL_SUM_DTYPES and num_tokens:
                # The fixed-order gather-reduce kernel on the device (same bits as below).
                return kernels.gather_reduce(back.to(y.device), combine_index.to(y.device))
            # fp64 (no kernel) or no tokens: the host sum, then one copy
            return self.combine_host(back.cpu(), layout_send_src.cpu(), send_counts, num_tokens).to(y.device)
        # Host rows: the peers' rows come back into their places in `back`; this rank's own
        # rows stay in y (the same rows in the same order) and the sum reads them there.
        me = self.group.rank
        sd, rd = offsets(send_counts), offsets(recv_counts)
        back = self.work("combine back", (s, rows.shape[1]), torch.uint8)
        sends = [(p, rd[p], recv_counts[p]) for p in self.peers]
        recvs = [(p, sd[p], send_counts[p]) for p in self.peers]
        self.group.wait_rows(self.group.start_rows([(rows, sends, back, recvs)], "combine payload"))
        back = back.view(dtype).view(s, width)
        own = y[rd[me]: rd[me] + send_counts[me]]
        return self.combine_host(back, layout_send_src, send_counts, num_tokens, own=own)

    def combine_host(self, back: torch.Tensor, send_src: torch.Tensor, send_counts, num_tokens: int, own: torch.Tensor | None = None) -> torch.Tensor:
        """Combine's sum on the CPU (`reduce`). own: this rank's own segment of rows,
        when it lies there instead of in `back`."""
        me, start = self.group.rank, offsets(send_counts)
        if own is not None:
            back[start[me]: start[me] + own.shape[0]].copy_(own)
        return self.reduce(back, send_src, send_counts, num_tokens)

    def reduce(self, back: torch.Tensor, send_src: torch.Tensor, send_counts, num_tokens: int) -> torch.Tensor:
        """The PyTorch formulation of combine's sum: back [S, W] in rank-major segments ->
        [T, W], segments added in ascending rank order into an fp32 (fp64) zero, rounded once."""
        width, dtype = back.shape[1], back.dtype
        acc_t = acc_dtype(dtype)
        # fp32/fp64 rows accumulate straight into the (fresh) output; narrower ones into a
        # reused fp32 buffer that is rounded once at the end.
        acc = torch.empty(num_tokens, width, dtype=acc_t) if acc_t == dtype else self.work("combine acc", (num_tokens, width), acc_t)
        acc.zero_()
        start = 0
        for count in send_counts:   # ascending rank; a segment holds each token at most once
            if count:
                seg = back[start:start + count]
                if acc_t != dtype:
                    wide = self.work("combine wide", (count, width), acc_t)
                    wide.copy_(seg)
                    seg = wide
                acc.index_add_(0, send_src[start:start + count], seg)
            start += count
        return acc if acc_t == dtype else acc.to(dtype)
