"""`Group`: a thin wrapper over an mpi4py communicator.

Bootstrap (allgather, bcast, barrier of small Python objects) and the host transport
(tensor rows: per-peer `start_rows`/`wait_rows`, or one `ialltoallv`). Nothing here blocks in MPI: every exchange starts
nonblocking requests and polls them against a deadline of FMO_COMM_TIMEOUT seconds, so a
peer that never arrives raises `CommTimeoutError` naming it instead of hanging the job.

Small exchanges are per-peer Isend/Irecv pairs under one tag per exchange. All ranks
perform exchanges in the same order, so the tags line up; a rank that skips an exchange
leaves its peers' receives unmatched, and those peers know exactly whom they miss. After a
time-out the group's message stream is out of step (late messages may still arrive under
old tags), so the group refuses further use: make a new one (e.g. over `comm.Dup()`).
"""
from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import env
from ..errors import CommError, CommTimeoutError, InputError

_TAG_BASE = 1000
_TAG_SPAN = 30000   # MPI guarantees tags up to 32767


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - the [mpi] extra is missing
        raise CommError(f"mpi4py is not installed (pip install 'fastmoe-ops[mpi]'): {e}") from None
    return MPI


def _host_bytes(t: torch.Tensor):
    """The bytes MPI reads or writes: a numpy uint8 view of a contiguous CPU tensor (works for
    bf16/fp8, which numpy lacks); a CUDA tensor's uint8 view as it is (mpi4py takes its
    __cuda_array_interface__: only for a CUDA-aware MPI, see FMO_MPI_CUDA_AWARE)."""
    flat = t.view(torch.uint8).reshape(-1)
    return flat if flat.is_cuda else flat.numpy()


def timeout_error(what: str, missing) -> CommTimeoutError:
    """The error for a wait that ran out of FMO_COMM_TIMEOUT, naming the ranks it waited for."""
    return CommTimeoutError(f"{what}: timed out after FMO_COMM_TIMEOUT={env.number('FMO_COMM_TIMEOUT'):g} s waiting for "
                            f"rank(s) {sorted(set(int(m) for m in missing))}")


def poll(requests, deadline: float, what: str, names) -> None:
    """Wait for `requests` (MPI requests) until `deadline` (time.monotonic()); on time-out
    raise CommTimeoutError naming `names[i]` for every request i still pending."""
    MPI = _mpi()
    requests = list(requests)
    spins = 0
    # The loop runs for every wait of every exchange, so each turn is kept to one MPI call
    # (Testall leaves the requests untouched until all are done) and one yield; the clock
    # is read every 64 turns.
    while not MPI.Request.Testall(requests):
        spins += 1
        if spins % 64 == 0 and time.monotonic() > deadline:
            raise timeout_error(what, [names[i] for i, req in enumerate(requests) if not req.Test()])
        # Nonblocking requests progress only inside MPI calls, so keep testing; yield the
        # core between tests (ranks may outnumber cores), and back off to sleeping only
        # after a long wait.
        if spins < 20000:
            os.sched_yield()
        else:
            time.sleep(1e-4)


@dataclass
class _Orphans:
    """Requests abandoned by a time-out and the buffers they still point into: kept alive
    until the group is freed, because MPI may still write into them."""
    requests: list = field(default_factory=list)
    buffers: list = field(default_factory=list)


class Group:
    """Ranks taking part in expert parallelism: `Group(MPI.COMM_WORLD)`.

    rank, size; allgather / bcast / barrier (bootstrap, small picklable objects);
    start_rows / ialltoallv (host transport of tensor rows). The group does not own `comm`."""

    def __init__(self, comm):
        MPI = _mpi()
        if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
            raise InputError(f"comm: expected an mpi4py communicator, got {comm!r}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._seq = 0
        self._broken: str | None = None
        self._orphans = _Orphans()
        self._row_types: dict[int, object] = {}

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, size={self.size})"

    # ------------------------------------------------------------------ plumbing
    def _check_usable(self, what: str) -> None:
        if self._broken is not None:
            raise CommError(f"{what}: this Group is unusable after an earlier failure ({self._broken}); "
                            f"create a new Group over a fresh communicator (comm.Dup())")

    def _next_tag(self) -> int:
        self._seq += 1
        return _TAG_BASE + self._seq % _TAG_SPAN

    def _deadline(self) -> float:
        return time.monotonic() + env.number("FMO_COMM_TIMEOUT")

    def _wait(self, requests, names, what: str, buffers=()) -> None:
        try:
            poll(requests, self._deadline(), what, names)
        except CommTimeoutError as e:
            self._abandon(requests, buffers, str(e))
            raise

    def _abandon(self, requests, buffers, why: str) -> None:
        MPI = _mpi()
        for req in requests:
            if req != MPI.REQUEST_NULL:
                try:
                    req.Cancel()
                except MPI.Exception:
                    pass
        self._orphans.requests.extend(requests)
        self._orphans.buffers.extend(buffers)
        self._broken = why

    def exchange_arrays(self, sends: dict[int, np.ndarray], recvs: dict[int, np.ndarray], what: str) -> None:
        """Per-peer Isend/Irecv of numpy arrays under one fresh tag; the entry for this rank
        (if any) is copied locally. Raises CommTimeoutError naming the peers that never sent."""
        self._check_usable(what)
        tag = self._next_tag()
        requests, names = [], []
        for peer, buf in recvs.items():
            if peer != self.rank:
                requests.append(self.comm.Irecv(buf, source=peer, tag=tag))
                names.append(peer)
        for peer, buf in sends.items():
            if peer != self.rank:
                requests.append(self.comm.Isend(buf, dest=peer, tag=tag))
                names.append(peer)
        if self.rank in recvs:
            recvs[self.rank][...] = sends[self.rank]
        self._wait(requests, names, what, buffers=(sends, recvs))

    # ------------------------------------------------------------------ bootstrap
    def allgather_array(self, local: np.ndarray, what: str = "allgather") -> np.ndarray:
        """Every rank's fixed-shape array, stacked: [size, *local.shape]. One round trip."""
        local = np.ascontiguousarray(local)
        out = np.empty((self.size,) + local.shape, local.dtype)
        self.exchange_arrays({p: local for p in range(self.size)}, {p: out[p] for p in range(self.size)}, what)
        return out

    def allgather(self, obj, what: str = "allgather") -> list:
        """Every rank's picklable object, in rank order."""
        blob = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = self.allgather_array(np.array([blob.size], np.int64), what)[:, 0]
        bufs = {p: np.empty(int(sizes[p]), np.uint8) for p in range(self.size)}
        self.exchange_arrays({p: blob for p in range(self.size)}, bufs, what)
        return [pickle.loads(bufs[p].tobytes()) for p in range(self.size)]

    def bcast(self, obj, root: int = 0, what: str = "bcast"):
        """`obj` from `root` on every rank."""
        if not (isinstance(root, int) and 0 <= root < self.size):
            raise InputError(f"root: expected a rank in [0, {self.size}), got {root!r}")
        if self.rank == root:
            blob = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
            size = np.array([blob.size], np.int64)
            self.exchange_arrays({p: size for p in range(self.size)}, {}, what)
            self.exchange_arrays({p: blob for p in range(self.size)}, {}, what)
            return obj
        size = np.empty(1, np.int64)
        self.exchange_arrays({}, {root: size}, what)
        blob = np.empty(int(size[0]), np.uint8)
        self.exchange_arrays({}, {root: blob}, what)
        return pickle.loads(blob.tobytes())

    def barrier(self, what: str = "barrier") -> None:
        """Returns once every rank has entered (a token from every peer)."""
        token = np.zeros(1, np.int8)
        self.exchange_arrays({p: token for p in range(self.size)},
                             {p: np.empty(1, np.int8) for p in range(self.size)}, what)

    # ------------------------------------------------------------------ host transport
    def _row_type(self, row_bytes: int):
        dtype = self._row_types.get(row_bytes)
        if dtype is None:
            MPI = _mpi()
            dtype = MPI.BYTE.Create_contiguous(row_bytes).Commit()
            self._row_types[row_bytes] = dtype
        return dtype

    def ialltoallv(self, send: torch.Tensor, send_counts, recv: torch.Tensor, recv_counts, what: str):
        """Start an MPI Ialltoallv of rows: `send` [sum(send_counts), ...] goes in rank-major
        segments, `recv` [sum(recv_counts), ...] receives rank-major segments. Both contiguous
        tensors with the same row size in bytes: CPU tensors, or CUDA tensors with a
        CUDA-aware MPI. Returns the request (see `wait`)."""
        self._check_usable(what)
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        recv_row = math.prod(recv.shape[1:]) * recv.element_size()
        if row_bytes != recv_row or row_bytes == 0:
            raise InputError(f"{what}: expected equal, non-zero row sizes, got send {row_bytes} B and recv {recv_row} B")
        if not (send.is_contiguous() and recv.is_contiguous()):
            raise InputError(f"{what}: expected contiguous send and receive tensors")
        sc = np.asarray(send_counts, np.int64)
        rc = np.asarray(recv_counts, np.int64)
        if sc.sum() != send.shape[0] or rc.sum() > recv.shape[0]:
            raise InputError(f"{what}: counts {sc.tolist()} / {rc.tolist()} do not fit {send.shape[0]} / {recv.shape[0]} rows")
        sd = np.concatenate(([0], np.cumsum(sc)[:-1]))
        rd = np.concatenate(([0], np.cumsum(rc)[:-1]))
        dtype = self._row_type(row_bytes)
        sbuf, rbuf = _host_bytes(send), _host_bytes(recv)
        req = self.comm.Ialltoallv([sbuf, (sc.astype(np.int32), sd.astype(np.int32)), dtype],
                                   [rbuf, (rc.astype(np.int32), rd.astype(np.int32)), dtype])
        return _Pending(req, (send, recv, sbuf, rbuf), what)

    def start_rows(self, streams, what: str) -> "_Rows":
        """Start per-peer transfers of tensor rows; `wait_rows` completes them. streams: one
        (src, sends, dst, recvs) per stream, src / dst contiguous CPU tensors of equal row
        size in bytes; sends: (peer, first, count) triples, src rows [first, first + count)
        go to that peer; recvs: (peer, first, count) triples, dst rows [first, first + count)
        receive that peer's rows. Empty transfers are skipped (both sides know the counts).
        One fresh tag per stream; every rank starts the same streams in the same order, so
        they line up. (Per-peer messages rather than one Ialltoallv: a time-out can name
        the peers that never arrived, and a caller's own rows need not cross MPI.)"""
        self._check_usable(what)
        for src, sends, dst, recvs in streams:   # all checked before anything is posted
            row_bytes = math.prod(src.shape[1:]) * src.element_size()
            if row_bytes != math.prod(dst.shape[1:]) * dst.element_size() or row_bytes == 0:
                raise InputError(f"{what}: expected equal, non-zero row sizes, got {tuple(src.shape)} {src.dtype} "
                                 f"and {tuple(dst.shape)} {dst.dtype}")
            if not (src.is_contiguous() and dst.is_contiguous()):
                raise InputError(f"{what}: expected contiguous send and receive tensors")
            for table, n in ((recvs, dst.shape[0]), (sends, src.shape[0])):
                for peer, first, count in table:
                    if first + count > n:
                        raise InputError(f"{what}: rows [{first}, {first + count}) for rank {peer} do not fit {n} rows")
        requests, names, buffers = [], [], []
        for src, sends, dst, recvs in streams:
            tag = self._next_tag()
            row_bytes = math.prod(src.shape[1:]) * src.element_size()
            row = self._row_type(row_bytes)
            sbuf, rbuf = _host_bytes(src), _host_bytes(dst)
            buffers.append((src, dst, sbuf, rbuf))
            for table, buf, post, key in ((recvs, rbuf, self.comm.Irecv, "source"), (sends, sbuf, self.comm.Isend, "dest")):
                for peer, first, count in table:
                    if count:
                        requests.append(post([buf[first * row_bytes:], count, row], **{key: peer, "tag": tag}))
                        names.append(peer)
        return _Rows(requests, names, buffers, what)

    def wait_rows(self, pending: "_Rows") -> None:
        """Complete `start_rows`; a time-out names the peers whose transfers never finished."""
        self._wait(pending.requests, pending.names, pending.what, buffers=pending.buffers)

    def wait(self, pendings, peers_hint=None) -> None:
        """Wait for started host transfers. A time-out names `peers_hint` (the peers this
        rank exchanges with) since a collective cannot say which peer is late."""
        if not pendings:
            return
        names = [tuple(peers_hint) if peers_hint is not None else "unknown" for _ in pendings]
        what = " + ".join(p.what for p in pendings)
        try:
            poll([p.request for p in pendings], self._deadline(), what, [str(n) for n in names])
        except CommTimeoutError as e:
            self._orphans.requests.extend(p.request for p in pendings)
            self._orphans.buffers.extend(p.buffers for p in pendings)
            self._broken = str(e)
            raise

    def free(self) -> None:
        """Release the MPI datatypes this group created (the communicator is the caller's)."""
        for dtype in self._row_types.values():
            try:
                dtype.Free()
            except Exception:  # MPI already finalised at interpreter exit
                pass
        self._row_types.clear()


@dataclass
class _Rows:
    requests: list
    names: list
    buffers: list
    what: str


@dataclass
class _Pending:
    request: object
    buffers: tuple
    what: str
