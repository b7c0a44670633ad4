"""fmo.comm.Group across real MPI ranks: bootstrap collectives, the host transport, and a
peer that never arrives (CommTimeoutError naming it, on a communicator of its own)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import fastmoe_ops as fmo

from mpi_util import all_agree, comm, need_ranks  # noqa: F401 (comm: a fixture)


def outcome(fn):
    try:
        return True, repr(fn())
    except Exception as e:  # gathered, then asserted on every rank
        return False, f"{type(e).__name__}: {e}"


def test_bootstrap_collectives(comm):
    need_ranks(comm, 2)
    g = fmo.comm.Group(comm)
    r, n = g.rank, g.size

    def body():
        got = g.allgather({"rank": r, "blob": list(range(r))})
        assert got == [{"rank": p, "blob": list(range(p))} for p in range(n)], got
        arr = g.allgather_array(np.array([r, 10 * r], np.int64))
        assert arr.tolist() == [[p, 10 * p] for p in range(n)]
        for root in range(n):
            assert g.bcast(("root", root, "x" * 100000) if r == root else None, root=root) == ("root", root, "x" * 100000)
        g.barrier()
        return "ok"

    all_agree(comm, *outcome(body))


def test_host_alltoallv_rows(comm):
    need_ranks(comm, 2)
    g = fmo.comm.Group(comm)
    r, n = g.rank, g.size
    send_counts = [(r + p) % 3 for p in range(n)]          # ragged, some zero
    recv_counts = [(p + r) % 3 for p in range(n)]
    send = torch.cat([torch.full((c, 5), float(r * 100 + p), dtype=torch.bfloat16) for p, c in enumerate(send_counts)])
    recv = torch.full((sum(recv_counts), 5), float("nan"), dtype=torch.bfloat16)

    def body():
        g.wait([g.ialltoallv(send, send_counts, recv, recv_counts, "test")])
        want = torch.cat([torch.full((c, 5), float(p * 100 + r), dtype=torch.bfloat16) for p, c in enumerate(recv_counts)])
        assert torch.equal(recv, want), (recv, want)
        return "ok"

    all_agree(comm, *outcome(body))


def test_start_rows_per_peer_and_refusals(comm):
    """Group.start_rows / wait_rows (the host transport's per-peer path): two streams at
    once, ragged counts (some zero), rows landing at the given offsets and nowhere else;
    then the refusals, raised before anything is posted."""
    need_ranks(comm, 2)
    g = fmo.comm.Group(comm)
    r, n = g.rank, g.size
    peers = [p for p in range(n) if p != r]
    send_counts = {p: (r + p) % 3 for p in peers}
    recv_counts = {p: (p + r) % 3 for p in peers}

    def table(counts, first):
        out, at = [], first
        for p in peers:
            out.append((p, at, counts[p]))
            at += counts[p]
        return out

    sends, recvs = table(send_counts, 1), table(recv_counts, 2)     # offsets inside the tensors
    n_send, n_recv = 1 + sum(send_counts.values()), 2 + sum(recv_counts.values()) + 1

    def body():
        a = torch.full((n_send, 5), -1.0, dtype=torch.bfloat16)
        b = torch.full((n_send, 3), -1, dtype=torch.int64)
        for p, first, c in sends:
            a[first:first + c] = float(r * 100 + p)
            b[first:first + c] = r * 1000 + p
        ra = torch.full((n_recv, 5), float("nan"), dtype=torch.bfloat16)
        rb = torch.full((n_recv, 6), 7, dtype=torch.int32)     # same row bytes as b's rows
        g.wait_rows(g.start_rows([(a, sends, ra, recvs), (b, sends, rb, recvs)], "test rows"))
        want_a = torch.full((n_recv, 5), float("nan"), dtype=torch.bfloat16)
        want_b = torch.full((n_recv, 6), 7, dtype=torch.int32)
        for p, first, c in recvs:
            want_a[first:first + c] = float(p * 100 + r)
            want_b[first:first + c] = torch.full((c, 3), p * 1000 + r, dtype=torch.int64).view(torch.int32)
        assert torch.equal(ra.view(torch.int16), want_a.view(torch.int16)), (ra, want_a)
        assert torch.equal(rb, want_b), (rb, want_b)
        for streams, fragment in (([(a, sends, torch.empty(n_recv, 4, dtype=torch.bfloat16), recvs)], "equal, non-zero row sizes"),
                                  ([(a, sends, ra[:1], recvs)], "do not fit 1 rows"),
                                  ([(a, sends, torch.empty(n_recv, 10, dtype=torch.bfloat16)[:, ::2], recvs)], "contiguous")):
            with pytest.raises(fmo.InputError, match=fragment):
                g.start_rows(streams, "test rows")
        g.barrier()
        return "ok"

    all_agree(comm, *outcome(body))


def test_missing_peer_times_out_naming_it(comm, monkeypatch):
    """The last rank skips the exchange: the others raise CommTimeoutError naming it within
    about FMO_COMM_TIMEOUT; the broken group then refuses use; the world stays usable."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_COMM_TIMEOUT", "0.5")
    sub = comm.Dup()           # the time-out leaves stray messages here, not on the world
    g = fmo.comm.Group(sub)
    last = g.size - 1
    if g.rank == last:
        ok, detail = True, "skipped"
    else:
        t0 = time.monotonic()
        try:
            g.barrier()
            ok, detail = False, "barrier returned without the last rank"
        except fmo.CommTimeoutError as e:
            elapsed = time.monotonic() - t0
            ok = f"rank(s) [{last}]" in str(e) and elapsed < 10
            detail = f"{e} after {elapsed:.2f} s"
            try:
                g.barrier()
                ok, detail = False, "a broken group was used again"
            except fmo.CommError as e2:
                ok = ok and "unusable" in str(e2)
    all_agree(comm, ok, detail)
    # The world communicator is untouched: a fresh group over it works at once.
    all_agree(comm, *outcome(lambda: fmo.comm.Group(comm).allgather(comm.Get_rank())))


def test_bad_root_and_comm():
    with pytest.raises(fmo.InputError, match="comm: expected an mpi4py communicator"):
        fmo.comm.Group(object())
