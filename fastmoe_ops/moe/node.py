"""The node-local host transport ('cma'): CPU rows between ranks of one machine without MPI
messages.

Every rank reads what it receives straight out of its peers' tensors with process_vm_readv
(Linux cross-memory attach), and the ranks meet at flags in one small shared-memory
control block instead of exchanging MPI messages (csrc/moe/host_node.cpp has the protocol).
Per call:
  handshake: every rank publishes its metadata row (validation, counts, and the addresses
             of the tensors its peers will read) and waits for everyone's;
  dispatch:  the receiver reads, from each sender, that sender's packed small row extras
             (source token, then FP8 scales, expert ids, weights: a few dozen bytes a row)
             in one read, then x's rows themselves, gathered by the read (one iovec per run
             of consecutive source tokens) straight into recv_x: one copy in all;
  combine:   the source rank reads its rows back from each peer's y block by block into a
             cache-sized scratch and sums them there, in ascending rank order (the same
             bits as the other paths): the rows cross memory once;
  finish:    a rank signals when its reads are done and, before returning, waits for every
             peer's signal, because until then peers may still be reading its tensors.
A peer that never arrives (or never finishes reading) raises CommTimeoutError naming it
after FMO_COMM_TIMEOUT; a read that fails is reported on every rank alike.

Chosen by Buffer(host_transport='auto') when every rank is on one machine and a probe read
between every pair of ranks works (ptrace permission: same user, and Yama's ptrace_scope or
a container may forbid it); otherwise the MPI messages of fastmoe_ops.moe.host serve.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from .. import env
from ..comm import Group
from ..comm.group import timeout_error
from ..errors import CommError, UnsupportedError
from . import host, host_native

SCRATCH_BYTES = 1 << 19  # combine's per-block rows: well inside a core's L2
MODES = ("auto", "mpi", "cma")


def _arr(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64))


def unavailable_reason(group: Group) -> str | None:
    """Why the node-local transport cannot serve `group` (None: it can). Collective; every
    rank returns the same answer."""
    from mpi4py import MPI

    local = group.comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        same_node = local.Get_size() == group.size
    finally:
        local.Free()
    if not same_node:
        return "the ranks are not all on one machine"
    fns = host_native.node_functions()
    reasons = group.allgather(None if fns is not None else "no host C++ compiler to build csrc/moe/host_node.cpp",
                              "Buffer(host_transport)")
    if any(reasons):
        return next(r for r in reasons if r)
    # A probe read from every peer: the kernel's ptrace check is what may refuse it.
    probe = np.array([1000 + group.rank], np.int64)
    peers = group.allgather((os.getpid(), probe.ctypes.data), "Buffer(host_transport) probe")
    got, failed = np.zeros(group.size, np.int64), np.zeros(1, np.int64)
    pid = _arr([0 if p == group.rank else peers[p][0] for p in range(group.size)])
    remote = _arr([peers[p][1] for p in range(group.size)])
    local_at = _arr([got.ctypes.data + 8 * p for p in range(group.size)])
    nbytes = _arr([8] * group.size)
    err = fns["read"](group.size, pid.ctypes.data, remote.ctypes.data, local_at.ctypes.data, nbytes.ctypes.data,
                      failed.ctypes.data)
    ok = err == 0 and got.tolist() == [1000 + p for p in range(group.size)]
    why = None if ok else f"rank {group.rank} cannot read rank {int(failed[0])}'s memory ({os.strerror(err) if err else 'wrong bytes'})"
    group.barrier("Buffer(host_transport) probe")   # no rank frees its probe while a peer reads it
    reasons = group.allgather(why, "Buffer(host_transport) probe")
    return next((r for r in reasons if r), None)


class NodeTransport:
    """The control block and reads of one Buffer over its private Group (collective)."""

    def __init__(self, group: Group, width: int, rows: host.HostTransport):
        from ..sim import ipc as shm

        self.group, self.width, self.ranks, self.rank = group, width, group.size, group.rank
        self.rows = rows   # the Buffer's reused work buffers (and the PyTorch sum)
        self.fns = host_native.node_functions()
        nbytes = self.fns["control_bytes"](self.ranks, width)
        made = shm.create(nbytes) if group.rank == 0 else None
        handle = group.bcast(made[0] if made else None, 0, "Buffer(host_transport='cma')")
        self._block = made[1] if made else shm.open(handle)
        group.barrier("Buffer(host_transport='cma')")
        if made:   # every rank has mapped it: the name can go (nothing to leak if a rank dies)
            shm.unlink(handle)
        self.ctrl = self._block.data_ptr()
        self.pids = group.allgather(os.getpid(), "Buffer(host_transport='cma')")
        self.epoch = 0
        self._broken: str | None = None
        self._failed = np.zeros(1, np.int64)
        self._scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)

    def close(self) -> None:
        from ..sim import ipc as shm

        if self._block is not None:
            shm.close(self._block)
            self._block = None

    # ------------------------------------------------------------------ meeting points
    def _check(self, what: str) -> None:
        if self._broken is not None:
            raise CommError(f"{what}: this Buffer is unusable after an earlier failure ({self._broken}); create a new one")

    def handshake(self, row: np.ndarray, what: str) -> np.ndarray:
        """Every rank's row ([R, width] int64) once all have published theirs."""
        self._check(what)
        self.epoch += 1
        full = np.zeros(self.width, np.int64)
        full[: row.shape[0]] = row
        table, missing = np.empty((self.ranks, self.width), np.int64), np.empty(self.ranks, np.int64)
        late = self.fns["handshake"](self.ctrl, self.ranks, self.width, self.rank, self.epoch, full.ctypes.data,
                                     env.number("FMO_COMM_TIMEOUT"), table.ctypes.data, missing.ctypes.data)
        if late:
            self._fail(timeout_error(what, missing[:late].tolist()))
        return table

    def signal_done(self, error: int = 0) -> None:
        self.fns["signal_done"](self.ctrl, self.ranks, self.rank, self.epoch, error)

    def finish(self, what: str) -> None:
        """Wait until no peer reads this rank's tensors any more; raise, on every rank
        alike, if any rank's reads failed."""
        errors, missing = np.empty(self.ranks, np.int64), np.empty(self.ranks, np.int64)
        late = self.fns["wait_done"](self.ctrl, self.ranks, self.epoch, env.number("FMO_COMM_TIMEOUT"),
                                     errors.ctypes.data, missing.ctypes.data)
        if late:
            self._fail(timeout_error(f"{what} (peers reading this rank's rows)", missing[:late].tolist()))
        bad = [(p, int(e)) for p, e in enumerate(errors) if e]
        if bad:
            p, e = bad[0]
            self._fail(CommError(f"{what}: rank {p} could not read its peers' rows "
                                 f"({os.strerror(e) if e > 0 else 'error ' + str(e)})"))

    def _fail(self, error: Exception):
        self._broken = str(error)
        raise error

    def _pids(self) -> np.ndarray:
        return _arr([0 if p == self.rank else pid for p, pid in enumerate(self.pids)])

    def _reads_done(self, err: int, what: str) -> None:
        """Signal this rank's reads as finished (failed: with the errno, and raise after
        the peers are done with this rank's tensors)."""
        self.signal_done(err)
        if err:
            self.finish(what)   # raises the read error on every rank alike

    # ------------------------------------------------------------------ dispatch
    def pack(self, extras, send_src: torch.Tensor) -> torch.Tensor:
        """[S, 8 + extras' row bytes] uint8 in send order: each row's source token, then
        its rows of `extras` (contiguous [T, ...] tensors) side by side; the buffer peers read."""
        widths = _arr([host.row_bytes(e) for e in extras])
        sources = _arr([e.data_ptr() for e in extras])
        out = self.rows.work("node packed", (send_src.shape[0], 8 + int(widths.sum())), torch.uint8)
        self.fns["pack"](send_src.data_ptr(), send_src.shape[0], len(extras), sources.ctypes.data, widths.ctypes.data,
                         out.data_ptr(), out.shape[1])
        return out

    def dispatch(self, x: torch.Tensor, packed: torch.Tensor, outs, matrix: np.ndarray, addresses: np.ndarray,
                 what: str) -> None:
        """Read this rank's rows: every sender's packed extras (its columns into outs[1:])
        and the x rows they name (into outs[0]), rank-major. addresses [R, 2]: each rank's
        x and packed buffer, as published in the handshake. Signals done."""
        r = self.rank
        recv_counts = matrix[:, r]
        n, stride, row = int(recv_counts.sum()), packed.shape[1], host.row_bytes(x)
        recv_packed = self.rows.work("node received", (n, stride), torch.uint8)
        rd = host.offsets(recv_counts)
        sd_of = [int(matrix[p, :r].sum()) for p in range(self.ranks)]   # where p's rows for r start
        # (Every array handed to C stays named until the call returns.)
        pid, counts = self._pids(), _arr(recv_counts)
        remote = _arr(addresses[:, 1] + np.array(sd_of) * stride)
        local = _arr([recv_packed.data_ptr() + rd[p] * stride for p in range(self.ranks)])
        err = self.fns["read"](self.ranks, pid.ctypes.data, remote.ctypes.data, local.ctypes.data,
                               (nbytes := counts * stride).ctypes.data, self._failed.ctypes.data)
        if not err:
            target = host.rows_bytes(outs[0])
            bases, at = _arr(addresses[:, 0]), _arr([target.data_ptr() + rd[p] * row for p in range(self.ranks)])
            err = self.fns["gather"](self.ranks, pid.ctypes.data, counts.ctypes.data, local.ctypes.data, stride,
                                     bases.ctypes.data, at.ctypes.data, row, self._failed.ctypes.data)
        self._reads_done(err, what)
        widths, targets = _arr([host.row_bytes(o) for o in outs[1:]]), _arr([o.data_ptr() for o in outs[1:]])
        self.fns["unpack"](recv_packed.data_ptr(), n, stride, len(outs) - 1, targets.ctypes.data, widths.ctypes.data)

    # ------------------------------------------------------------------ combine
    def combine(self, y: torch.Tensor, combine_index: torch.Tensor, matrix: np.ndarray, addresses: np.ndarray,
                send_src: torch.Tensor, num_tokens: int, what: str) -> torch.Tensor:
        """out [T, W]: each token's rows from every peer's y (addresses [R] of each rank's y)
        summed in ascending rank order. Signals done."""
        r, width, dtype = self.rank, y.shape[1], y.dtype
        row = width * y.element_size()
        send_counts = matrix[r]
        sd = host.offsets(send_counts)
        # Rank p's rows for r start after the rows p received from ranks before r.
        first = _arr([int(addresses[p]) + int(matrix[:r, p].sum()) * row for p in range(self.ranks)])
        pid = self._pids()
        if dtype in host_native.DTYPE_CODE:
            out = torch.empty(num_tokens, width, dtype=dtype)
            index0 = _arr(sd)
            err = self.fns["combine"](self.ranks, pid.ctypes.data, first.ctypes.data, index0.ctypes.data,
                                      combine_index.data_ptr(), out.data_ptr(), num_tokens, width,
                                      host_native.DTYPE_CODE[dtype], y.element_size(), self._scratch.data_ptr(),
                                      self._scratch.numel(), self._failed.ctypes.data)
            if err < 0:
                raise UnsupportedError(f"{what}: the native sum refused dtype {dtype}")
            self._reads_done(err, what)
            return out
        # fp64 (no native sum): read every rank's rows (own included), then the PyTorch sum.
        back = self.rows.work("node combine back", (int(send_counts.sum()), width), dtype)
        at, nbytes = _arr([back.data_ptr() + sd[p] * row for p in range(self.ranks)]), _arr(send_counts * row)
        err = self.fns["read"](self.ranks, pid.ctypes.data, first.ctypes.data, at.ctypes.data, nbytes.ctypes.data,
                               self._failed.ctypes.data)
        self._reads_done(err, what)
        return self.rows.reduce(back, send_src, send_counts.tolist(), num_tokens)
