"""The node-local host transport (host_transport='cma', fastmoe_ops.moe.node) across real
MPI ranks: what 'auto' picks, the refusal where it cannot serve, read failures reported on
every rank alike, reads batched past the kernel's iovec limit, and the same bits as the MPI
transport. (Every test of test_moe_dispatch.py also runs over it.)"""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.moe import node
from fastmoe_ops.reference import moe as ref

from mpi_util import all_agree, need_ranks, run_all
from test_moe_dispatch import bitwise, expect_same_error, inputs


@pytest.fixture
def cma(comm):
    why = node.unavailable_reason(fmo.comm.Group(comm))
    if why:
        pytest.skip(f"host_transport='cma' cannot run here: {why}")


def test_auto_picks_cma_on_one_machine_and_both_give_the_same_bits(comm, cma, monkeypatch):
    need_ranks(comm, 2)
    monkeypatch.delenv("FMO_HOST_TRANSPORT", raising=False)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 520, 4 * world, 5
    tokens = [40 + 7 * r for r in range(world)]
    xs, idxs, ws = inputs(world, 11, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.15)

    def body():
        results = {}
        for mode in ("auto", "mpi"):
            buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts,
                                 **({} if mode == "auto" else {"host_transport": mode}))
            assert buf.host_transport == ("cma" if mode == "auto" else "mpi"), (mode, buf.host_transport)
            recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
            y = (recv_x.float() * 1.5 - 0.25).to(torch.bfloat16)
            results[mode] = (recv_x, recv_idx, recv_w, tpe, buf.combine(y, handle))
            buf.destroy()
        for name, a, b in zip(("recv_x", "recv_topk_idx", "recv_topk_weights", "tokens_per_expert", "combine"),
                              results["auto"], results["mpi"]):
            bitwise(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), f"{name}: cma vs mpi")
        return "same bits"

    run_all(comm, body)


def test_cma_refused_alike_where_it_cannot_serve(comm, monkeypatch):
    need_ranks(comm, 2)
    monkeypatch.setattr(node, "unavailable_reason", lambda group: "the ranks are not all on one machine")
    expect_same_error(comm, lambda: fmo.moe.Buffer(fmo.comm.Group(comm), hidden=8, num_experts=comm.Get_size(),
                                                   host_transport="cma"),
                      fmo.UnsupportedError, "host_transport='cma': the ranks are not all on one machine")
    buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=8, num_experts=comm.Get_size(), host_transport="auto")
    all_agree(comm, buf.host_transport == "mpi", f"auto fell back to {buf.host_transport}")
    buf.destroy()
    expect_same_error(comm, lambda: fmo.moe.Buffer(fmo.comm.Group(comm), hidden=8, num_experts=comm.Get_size(),
                                                   host_transport="shm"),
                      fmo.InputError, "host_transport (or FMO_HOST_TRANSPORT): expected one of")


def test_a_failed_read_is_reported_on_every_rank(comm, cma, monkeypatch):
    """Rank 1 reads rank 0's x from a wrong address: every rank raises the same CommError
    naming rank 1 (after every rank has finished reading), and the Buffer refuses further
    use on every rank instead of hanging or returning garbage."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=16, num_experts=world, host_transport="cma")
    x, idx = torch.randn(world, 16), torch.arange(world)[:, None]   # token j to rank j: everyone reads everyone
    if rank == 1:
        real = buf._node.dispatch

        def misread(x_, packed, outs, matrix, addresses, what):
            addresses = addresses.copy()
            addresses[0, 0] = 4096   # the first page: never mapped
            return real(x_, packed, outs, matrix, addresses, what)
        monkeypatch.setattr(buf._node, "dispatch", misread)
    expect_same_error(comm, lambda: buf.dispatch(x, idx, None), fmo.CommError,
                      "dispatch: rank 1 could not read its peers' rows (Bad address)")
    expect_same_error(comm, lambda: buf.dispatch(x, idx, None), fmo.CommError, "unusable after an earlier failure")
    buf.destroy()


def test_reads_past_the_iovec_limit(comm, cma):
    """Every other token to every rank: each sender's rows for a peer are 1500 separate runs,
    more than one process_vm_readv takes (IOV_MAX = 1024), so the gather reads in batches.
    fp16 rows of 6 bytes (not a multiple of anything), bit for bit."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, t = 3, world, 3000
    xs = [torch.randn(t, hidden, generator=torch.Generator().manual_seed(s), dtype=torch.float64).to(torch.float16)
          for s in range(world)]
    idxs = [torch.where(torch.arange(t) % 2 == 0, torch.arange(t) % world, -1)[:, None] for _ in range(world)]
    idxs = [torch.cat([i, torch.where(i >= 0, (i + 1) % world, -1)], 1) for i in idxs]   # two ranks per kept token
    ws = [torch.rand(t, 2, generator=torch.Generator().manual_seed(50 + s)) for s in range(world)]
    want = ref.dispatch(xs, idxs, ws, experts)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, host_transport="cma")
        recv_x, recv_idx, recv_w, _, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
        bitwise(recv_x, want[rank]["x"], "recv_x")
        bitwise(recv_w, want[rank]["topk_weights"], "recv_topk_weights")
        ys = [w["x"] * (r + 2) for r, w in enumerate(want)]
        bitwise(buf.combine(ys[rank], handle), ref.combine(ys, [w["src"] for w in want], [t] * world)[rank], "combine")
        buf.destroy()
        return f"{recv_x.shape[0]} rows"

    run_all(comm, body)
