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

from mpi_util import (  # noqa: F401 (comm: a fixture)
    all_agree, bitwise, comm, expect_same_error, inputs, need_ranks, run_all,
)


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


def test_zero_copy_combine_buffer(comm, cma):
    """y written into Buffer.combine_buffer: peers sum it where it lies in shared memory.
    Bit for bit the ordinary combine, with every rank, then only some, using it; a larger
    second dispatch grows the region (peers map the new one); gradients flow through it."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 136, 2 * world, 3

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, host_transport="cma")
        for seed, tokens, users in ((21, [9 + r for r in range(world)], set(range(world))),
                                    (22, [200 + 5 * r for r in range(world)], {r for r in range(world) if r % 2})):
            xs, idxs, ws = inputs(world, seed, tokens, k, experts, hidden, torch.float32, minus_one=0.2)
            want = ref.dispatch(xs, idxs, ws, experts)
            ys = [(w["x"] * (r + 1) - 0.5).to(torch.bfloat16) for r, w in enumerate(want)]
            recv_x, _, _, _, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
            if rank in users:
                y = buf.combine_buffer(handle)
                assert y.shape == (handle.num_recv_rows, hidden) and buf._node.shared_offset(y, "combine") > 0
                y.copy_(ys[rank])
            else:
                y = ys[rank].clone()
            bitwise(buf.combine(y, handle), ref.combine(ys, [w["src"] for w in want], tokens)[rank],
                    f"zero-copy combine (seed {seed}, users {sorted(users)})")
        mapped = {p: g for (kind, p), (g, _) in buf._node._peer_regions.items() if kind == "combine"}
        assert all(mapped.get(p) == 2 for p in range(world) if p != rank and p % 2), mapped   # grown once, remapped
        # Gradients: the region as y, filled by a differentiable copy.
        xs, idxs, ws = inputs(world, 23, [6] * world, k, experts, hidden, torch.float32)
        grads = []
        for zero_copy in (True, False):
            x = xs[rank].clone().requires_grad_()
            recv_x, _, _, _, handle = buf.dispatch(x, idxs[rank], ws[rank])
            y = buf.combine_buffer(handle, torch.float32).copy_(recv_x * 3) if zero_copy else recv_x * 3
            buf.combine(y, handle).sum().backward()
            grads.append(x.grad)
        bitwise(grads[0], grads[1], "grad x through the combine buffer")
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_zero_copy_dispatch_buffer(comm, cma):
    """x written into Buffer.dispatch_buffer: peers copy its rows out of the shared region
    directly. Bit for bit the ordinary dispatch (every rank, then some using it; bf16, then
    an FP8 pair whose xq lies in the buffer), and the region grows with T."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 200, 2 * world, 3

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, host_transport="cma")
        for seed, tokens, users, fp8 in ((31, [7 + r for r in range(world)], set(range(world)), False),
                                         (32, [300 + 3 * r for r in range(world)], {r for r in range(world) if r % 2 == 0}, False),
                                         (33, [20 + r for r in range(world)], set(range(world)), True)):
            xs, idxs, ws = inputs(world, seed, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.2)
            if fp8:
                pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
                want = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
                mine = pairs[rank][0]
            else:
                want = ref.dispatch(xs, idxs, ws, experts)
                mine = xs[rank]
            x = buf.dispatch_buffer(tokens[rank], mine.dtype).copy_(mine) if rank in users else mine.clone()
            assert (buf._node.shared_offset(x, "dispatch") > 0) == (rank in users)
            recv_x, recv_idx, recv_w, _, _ = buf.dispatch((x, pairs[rank][1]) if fp8 else x, idxs[rank], ws[rank])
            got = recv_x[0].view(torch.uint8) if fp8 else recv_x
            bitwise(got, want[rank]["x"], f"zero-copy dispatch (seed {seed}, users {sorted(users)})")
            bitwise(recv_w, want[rank]["topk_weights"], "recv_topk_weights")
        mapped = {p: g for (kind, p), (g, _) in buf._node._peer_regions.items() if kind == "dispatch"}
        assert all(mapped.get(p) == 2 for p in range(world) if p != rank and p % 2 == 0), mapped   # grown once, remapped
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_single_rank_group_keeps_its_counts(comm, cma):
    """A group of one rank (each rank alone, by Split): the handle's [1, 1] count matrix must
    be the handle's own, not a view of the handshake table the next call overwrites."""
    alone = comm.Split(color=comm.Get_rank())
    try:
        buf = fmo.moe.Buffer(fmo.comm.Group(alone), hidden=8, num_experts=4, host_transport="cma")
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(comm.Get_rank()))
        idx = torch.tensor([[0, 1], [-1, -1], [2, -1], [3, 3], [-1, 1], [0, 2]])
        recv_x, _, _, _, handle = buf.dispatch(x, idx, torch.rand(6, 2))
        out = buf.combine(recv_x * 2, handle)
        ok = handle.counts.tolist() == [[5]] and torch.equal(out, torch.where((idx >= 0).any(1, keepdim=True), x * 2, 0.0))
        detail = f"counts after combine {handle.counts.tolist()}"
        buf.destroy()
    finally:
        alone.Free()
    all_agree(comm, ok, detail)
