"""Intra-node transport: every rank's buffer mapped by every peer, and the kernels of
csrc/moe/ipc.cuh moving rows through them on exactly the communication SM budget.

In the simulator the buffers are POSIX shared memory (`fastmoe_ops.sim.ipc`, the CPU
stand-in for CUDA IPC handles): handles are exchanged over the Group once, in the Buffer's
constructor. Buffer layout (bytes): [2R int64 counters | dispatch region: R slots x
slot_rows packed rows | combine region: R * slot_rows rows of hidden fp32-sized elements].

Reuse between calls is safe without extra flags: every dispatch/combine starts with the
Buffer's host handshake, which completes only once every peer has entered the same call,
i.e. has finished reading its regions in the previous one.
"""
from __future__ import annotations

import torch

from ..comm import Group
from ..errors import InputError, UnsupportedError
from ..ops import moe_ipc

SCALE_GROUP = 128


def _align(n: int, a: int = 128) -> int:
    return -(-n // a) * a


class IpcTransport:
    def __init__(self, group: Group, hidden: int, slot_rows: int, max_topk: int):
        from ..sim import ipc as shm

        if group.size > moe_ipc.MAX_RANKS:
            raise UnsupportedError(f"transport='ipc': at most {moe_ipc.MAX_RANKS} ranks per node, got {group.size}")
        self.group, self.slot_rows, self.max_topk, self.hidden = group, slot_rows, max_topk, hidden
        r = group.size
        # Widest packed row: fp32 x, or FP8 x + scales (narrower), then ids and weights.
        self.max_row = _align(hidden * 4, 16) + _align(4 * -(-hidden // SCALE_GROUP), 16) + _align(max_topk * 12, 16)
        self.dispatch_region = _align(2 * r * 8)
        self.combine_region = self.dispatch_region + _align(r * slot_rows * self.max_row)
        nbytes = self.combine_region + _align(r * slot_rows * hidden * 4)
        self.handle, self.mine = shm.create(nbytes)
        handles = group.allgather(self.handle, "Buffer(transport='ipc')")
        self.peers = [self.mine if p == group.rank else shm.open(h) for p, h in enumerate(handles)]
        group.barrier("Buffer(transport='ipc')")   # every peer has mapped every buffer
        self.expected = [0, 0]                       # counter targets: dispatch, combine

    def close(self) -> None:
        from ..sim import ipc as shm

        for t in self.peers:
            shm.close(t)
        self.peers = []

    def _params(self, tokens: int, rank: int, grid: int, which: int) -> moe_ipc.MoeIpcParams:
        self.expected[which] += grid
        p = moe_ipc.MoeIpcParams(tokens=tokens, rank=rank, ranks=self.group.size, slot_rows=self.slot_rows,
                                 dispatch_region=self.dispatch_region, combine_region=self.combine_region,
                                 expected=self.expected[which], hidden=self.hidden)
        for i, t in enumerate(self.peers):
            p.peers[i] = t.data_ptr()
        return p

    def dispatch(self, streams, outs, send_pos, matrix, grid: int, engine: str) -> None:
        """streams: contiguous [T, ...] tensors; outs: [rows, ...] receive tensors; send_pos
        [T, R] row within the destination's slot; matrix [R, R] counts (src -> dst)."""
        rank = self.group.rank
        if int(matrix.max(initial=0)) > self.slot_rows:
            raise InputError(f"dispatch: a rank would send {int(matrix.max())} tokens to one peer, more than "
                             f"max_tokens_per_rank={self.slot_rows} (Buffer(transport='ipc'))")
        seg = [s[0].numel() * s.element_size() if s.shape[0] else s.shape[1:].numel() * s.element_size() for s in streams]
        offsets, at = [], 0
        for b in seg:
            offsets.append(at)
            at = _align(at + b, 16)
        if at > self.max_row:
            raise InputError(f"dispatch: a packed row needs {at} bytes, the Buffer holds {self.max_row} "
                             f"(x wider than fp32 or k > max_topk={self.max_topk})")
        p = self._params(send_pos.shape[0], rank, grid, 0)
        p.send_pos, p.num_streams, p.row_stride = send_pos.data_ptr(), len(streams), at
        for i, (s, o) in enumerate(zip(streams, outs)):
            p.src[i], p.out[i], p.src_stride[i], p.seg_bytes[i], p.seg_offset[i] = s.data_ptr(), o.data_ptr(), seg[i], seg[i], offsets[i]
        for s in range(self.group.size):
            p.recv_counts[s] = int(matrix[s, rank])
        chunk = moe_ipc.chunk_bytes(*seg, at, self.dispatch_region, *(t.data_ptr() for t in (*streams, *outs, self.mine)))
        moe_ipc.run(moe_ipc.MoeIpcDispatchSpec(chunk_bytes=chunk), p, grid, engine=engine,
                    tensors=(*streams, *outs, send_pos, *self.peers))

    def combine(self, y, out, combine_index, matrix, grid: int, engine: str) -> None:
        """y [N, H] contiguous (received rows), out [T, H]; combine_index [T, R]."""
        rank = self.group.rank
        row = y.shape[1] * y.element_size()
        if row > self.hidden * 4:
            raise InputError(f"combine: y rows of {row} bytes exceed the Buffer's {self.hidden * 4} (fp32 at most)")
        p = self._params(out.shape[0], rank, grid, 1)
        p.hidden = y.shape[1]            # the rows' width (k for the topk-weight gradients)
        p.src[0], p.out[0], p.src_stride[0], p.seg_bytes[0], p.num_streams, p.row_stride = y.data_ptr(), out.data_ptr(), row, row, 1, row
        p.combine_index = combine_index.data_ptr()
        for s in range(self.group.size):
            p.recv_counts[s] = int(matrix[s, rank])
            p.back_offset[s] = int(matrix[s, :rank].sum())
        vec = 16 // y.element_size()
        aligned = row % 16 == 0 and self.combine_region % 16 == 0 and out.data_ptr() % 16 == 0
        chunk = moe_ipc.chunk_bytes(row, self.combine_region, y.data_ptr(), self.mine.data_ptr())
        spec = moe_ipc.MoeIpcCombineSpec(dtype=moe_ipc.dtype_name(y.dtype), chunk_bytes=chunk, vec_width=vec if aligned else 1)
        moe_ipc.run(spec, p, grid, engine=engine, tensors=(y, out, combine_index, *self.peers))
