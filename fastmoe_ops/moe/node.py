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
Zero copy: x written by the caller into Buffer.dispatch_buffer, or y into
Buffer.combine_buffer, lives in this rank's shared-memory region, which peers map (lazily,
by name, when a handshake first shows a new one): they copy x's rows out, or sum y's, where
they lie, without a cross-process read.
A peer that never arrives (or never finishes reading) raises CommTimeoutError naming it
after FMO_COMM_TIMEOUT; a read that fails is reported on every rank alike.

Chosen by Buffer(host_transport='auto') when every rank is on one machine and a probe read
between every pair of ranks works (ptrace permission: same user, and Yama's ptrace_scope or
a container may forbid it); otherwise the MPI messages of fastmoe_ops.moe.host serve.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import torch

from .. import env
from ..comm import Group, shm
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
    """The control block and reads of one Buffer over its private Group (collective).

    The handshake row is `width` int64 cells, its last three what peers read and where (see
    fastmoe_ops.moe.buffer). Arrays handed to C on every call are allocated once, their
    addresses taken once: per call, Python only fills them."""

    def __init__(self, group: Group, width: int, rows: host.HostTransport):
        self.group, self.width, self.ranks, self.rank = group, width, group.size, group.rank
        self.rows = rows   # the Buffer's reused work buffers (and the PyTorch sum)
        self.fns = host_native.node_functions()
        nbytes = self.fns["control_bytes"](self.ranks, width)
        made = shm.create(nbytes) if group.rank == 0 else None
        handle, self._token = group.bcast((made[0], uuid.uuid4().hex[:16]) if made else None, 0,
                                          "Buffer(host_transport='cma')")
        self._block = made[1] if made else shm.open(handle)
        group.barrier("Buffer(host_transport='cma')")
        if made:   # every rank has mapped it: the name can go (nothing to leak if a rank dies)
            shm.unlink(handle)
        self.ctrl = self._block.data_ptr()
        pids = group.allgather(os.getpid(), "Buffer(host_transport='cma')")
        self.epoch = 0
        self._broken: str | None = None
        self._scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)
        r = self.ranks
        self._pid = _arr([0 if p == self.rank else pid for p, pid in enumerate(pids)])   # 0: this process
        self._row = np.zeros(width, np.int64)
        self._table = np.zeros((r, width), np.int64)
        self._late = np.zeros(r, np.int64)       # ranks missing at a wait
        self._errors = np.zeros(r, np.int64)     # every rank's read error (errno) after a call
        self._failed = np.zeros(1, np.int64)     # which peer a failed read was from
        self._extras = np.zeros((2, 8), np.int64)   # dispatch: extras' output addresses and row widths
        self._regions: dict[str, tuple[int, torch.Tensor]] = {}   # kind -> (generation, tensor), this rank's
        self._peer_regions: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}
        self._at = {name: a.ctypes.data for name, a in (("pid", self._pid), ("row", self._row), ("table", self._table),
                                                       ("late", self._late), ("errors", self._errors),
                                                       ("failed", self._failed), ("extras", self._extras))}

    def close(self) -> None:
        if self._block is not None:
            shm.close(self._block)
            self._block = None
        for _, t in self._peer_regions.values():
            shm.close(t)
        for _, t in self._regions.values():
            shm.close(t)   # the creator's close unlinks the name; tensors still on it stay mapped
        self._peer_regions, self._regions = {}, {}

    # ------------------------------------------------------------------ shared regions
    # Each rank has a region per kind ("dispatch": x, "combine": y), created on first use
    # and replaced by a larger one when too small; peers map it by name when a handshake
    # first shows it.
    def _region_name(self, kind: str, rank: int, generation: int) -> str:
        return f"fmo_node_{self._token}_{kind}_{rank}_{generation}"

    def region(self, kind: str, nbytes: int) -> torch.Tensor:
        """This rank's `kind` region, at least nbytes long. A too small one is replaced (no
        call is in flight between calls, so no peer reads it); its memory lives on while
        tensors on it do, and is not published again."""
        current = self._regions.get(kind)
        if current is None or current[1].numel() < nbytes:
            generation = current[0] + 1 if current else 1
            size = max(int(nbytes), 2 * current[1].numel() if current else 0, 1 << 16)
            _, t = shm.create(size, name=self._region_name(kind, self.rank, generation))
            if current is not None:
                shm.close(current[1])
            self._regions[kind] = current = (generation, t)
        return current[1]

    def shared_offset(self, t: torch.Tensor, kind: str) -> int:
        """What the handshake publishes for t: (generation << 40) + offset when t lies in
        this rank's current `kind` region (peers then read it in place), else 0."""
        current = self._regions.get(kind)
        if current is None or not t.is_contiguous():
            return 0
        generation, region = current
        offset = t.data_ptr() - region.data_ptr()
        if offset < 0 or offset + t.numel() * t.element_size() > region.numel():
            return 0
        return (generation << 40) + offset

    def _in_place(self, addresses: np.ndarray, kind: str):
        """(pid array, addresses) for reading each peer's tensor: peers whose tensor lies in
        their shared region (column 2) are read in place through our mapping (pid 0,
        column 0 rewritten to the local address), the others across processes."""
        shared = addresses[:, 2]
        if not shared.any():
            return self._pid, addresses
        pid, addresses = self._pid.copy(), np.array(addresses)
        for p in np.flatnonzero(shared):
            if p != self.rank:
                value = int(shared[p])
                pid[p] = 0
                addresses[p, 0] = self._peer_region(kind, int(p), value >> 40).data_ptr() + (value & ((1 << 40) - 1))
        return pid, addresses

    def _peer_region(self, kind: str, p: int, generation: int) -> torch.Tensor:
        """Peer p's `kind` region `generation`, mapped here on first sight."""
        known = self._peer_regions.get((kind, p))
        if known is None or known[0] != generation:
            t = shm.open_named(self._region_name(kind, p, generation))
            if known is not None:
                shm.close(known[1])
            self._peer_regions[(kind, p)] = known = (generation, t)
        return known[1]

    # ------------------------------------------------------------------ meeting points
    def _check(self, what: str) -> None:
        if self._broken is not None:
            raise CommError(f"{what}: this Buffer is unusable after an earlier failure ({self._broken}); create a new one")

    def handshake(self, row: np.ndarray, what: str) -> np.ndarray:
        """Every rank's row ([R, width] int64, valid until the next handshake) once all
        have published theirs."""
        self._check(what)
        self.epoch += 1
        self._row[:] = 0
        self._row[: row.shape[0]] = row
        at = self._at
        late = self.fns["handshake"](self.ctrl, self.ranks, self.width, self.rank, self.epoch, at["row"],
                                     env.number("FMO_COMM_TIMEOUT"), at["table"], at["late"])
        if late:
            self._fail(timeout_error(what, self._late[:late].tolist()))
        return self._table

    def finish(self, what: str) -> None:
        """Wait until no peer reads this rank's tensors any more; raise, on every rank
        alike, if any rank's reads failed."""
        late = self.fns["wait_done"](self.ctrl, self.ranks, self.epoch, env.number("FMO_COMM_TIMEOUT"),
                                     self._at["errors"], self._at["late"])
        if late:
            self._fail(timeout_error(f"{what} (peers reading this rank's rows)", self._late[:late].tolist()))
        if self._errors.any():
            p = int(np.flatnonzero(self._errors)[0])
            e = int(self._errors[p])
            self._fail(CommError(f"{what}: rank {p} could not read its peers' rows "
                                 f"({os.strerror(e) if e > 0 else 'error ' + str(e)})"))

    def _fail(self, error: Exception):
        self._broken = str(error)
        raise error

    def _reads_done(self, err: int, what: str, signalled: bool = True) -> None:
        """This rank's reads are over (signalled: the native call has said so, with `err`);
        a failed read is raised once the peers are done with this rank's tensors."""
        if not signalled:
            self.fns["signal_done"](self.ctrl, self.ranks, self.rank, self.epoch, err)
        if err:
            self.finish(what)   # raises the read error on every rank alike

    # ------------------------------------------------------------------ dispatch
    def _set_extras(self, tensors) -> int:
        """The small per-row tensors' addresses and row widths into _extras (rows 0 and 1, as
        host_node.cpp reads them); their number."""
        n = len(tensors)
        if n > self._extras.shape[1]:
            raise UnsupportedError(f"at most {self._extras.shape[1]} per-row extras, got {n}")
        self._extras[0, :n] = [t.data_ptr() for t in tensors]
        self._extras[1, :n] = [host.row_bytes(t) for t in tensors]
        return n

    def pack(self, extras, send_src: torch.Tensor) -> torch.Tensor:
        """[S, 8 + extras' row bytes] uint8 in send order: each row's source token, then
        its rows of `extras` (contiguous [T, ...] tensors) side by side; the buffer peers read."""
        n = self._set_extras(extras)
        out = self.rows.work("node packed", (send_src.shape[0], 8 + int(self._extras[1, :n].sum())), torch.uint8)
        self.fns["pack"](send_src.data_ptr(), send_src.shape[0], n, self._at["extras"], self._at["extras"] + 64,
                         out.data_ptr(), out.shape[1])
        return out

    def dispatch(self, x: torch.Tensor, packed: torch.Tensor, outs, counts: np.ndarray, addresses: np.ndarray,
                 what: str) -> None:
        """Read this rank's rows: every sender's packed extras (their columns into outs[1:])
        and the x rows they name (into outs[0]), rank-major. counts [R, R] contiguous int64
        (row p: what p sends each rank); addresses [R, 3] (a view into the handshake
        table): each rank's x, its packed buffer, and x's place in its shared region (or 0).
        Signals done."""
        stride = packed.shape[1]
        n = int(counts[:, self.rank].sum())
        recv_packed = self.rows.work("node received", (n, stride), torch.uint8)
        n_extras = self._set_extras(outs[1:])
        row_pid, addresses = self._in_place(addresses, "dispatch")   # x rows: in place where shared
        err = self.fns["dispatch"](self.ctrl, self.ranks, self.rank, self.epoch, self._at["pid"], row_pid.ctypes.data,
                                   counts.ctypes.data, addresses.ctypes.data, addresses.strides[0] // 8,
                                   recv_packed.data_ptr(), stride,
                                   outs[0].data_ptr(), host.row_bytes(x), n_extras, self._at["extras"],
                                   self._at["extras"] + 64, self._at["failed"])
        self._reads_done(err, what)

    # ------------------------------------------------------------------ combine
    def combine(self, y: torch.Tensor, combine_index: torch.Tensor, counts: np.ndarray, addresses: np.ndarray,
                send_src: torch.Tensor, num_tokens: int, what: str) -> torch.Tensor:
        """out [T, W]: each token's rows from every rank's y (addresses [R, 3] view: y,
        unused, y's place in its shared region or 0) summed in ascending rank order. counts
        [R, R] as for dispatch. Signals done."""
        r, width, dtype = self.rank, y.shape[1], y.dtype
        pid, addresses = self._in_place(addresses, "combine")
        pid_at = pid.ctypes.data
        if dtype in host_native.DTYPE_CODE:
            out = torch.empty(num_tokens, width, dtype=dtype)
            err = self.fns["combine_all"](self.ctrl, self.ranks, r, self.epoch, pid_at, counts.ctypes.data,
                                          addresses.ctypes.data, addresses.strides[0] // 8, combine_index.data_ptr(),
                                          out.data_ptr(), num_tokens, width, host_native.DTYPE_CODE[dtype],
                                          y.element_size(), self._scratch.data_ptr(), self._scratch.numel(),
                                          self._at["failed"])
            if err < 0:   # (signalled done: wait until no peer reads y before refusing)
                self.finish(what)
                raise UnsupportedError(f"{what}: the native sum refused dtype {dtype}")
            self._reads_done(err, what)
            return out
        # fp64 (no native sum): read every rank's rows (own included), then the PyTorch sum.
        row = width * y.element_size()
        send_counts = counts[r]
        sd = host.offsets(send_counts)
        first = _arr([int(addresses[p, 0]) + int(counts[:r, p].sum()) * row for p in range(self.ranks)])
        back = self.rows.work("node combine back", (int(send_counts.sum()), width), dtype)
        at, nbytes = _arr([back.data_ptr() + sd[p] * row for p in range(self.ranks)]), _arr(send_counts * row)
        err = self.fns["read"](self.ranks, pid_at, first.ctypes.data, at.ctypes.data, nbytes.ctypes.data,
                               self._at["failed"])
        self._reads_done(err, what, signalled=False)
        return self.rows.reduce(back, send_src, send_counts.tolist(), num_tokens)
