"""fmo.moe.Buffer across real MPI ranks (CPU tensors, host transport, `sim` and `reference`
engines): dispatch bit-exact against an independent gather, combine bit-exact and
deterministic, FP8 pairs, capacity, autograd against a dense float64 computation, and every
error path raised alike on every rank.

Every rank builds every rank's inputs from (seed + rank), so each can evaluate the oracle
(fastmoe_ops.reference.moe, the obvious gather) for the whole world by itself."""
from __future__ import annotations

import dataclasses
import gc
import os
import time

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import moe as ref

from mpi_util import (  # noqa: F401 (comm: a fixture)
    all_agree, bitwise, buffer_inputs_on_device, comm, expect_same_error, inputs, need_ranks, run_all,
)

ENGINES = [e for e in ("sim", "reference") if e in fmo.available_backends()]


CASES = [  # (name, tokens per rank (None: 5 + 3r), k, E, H, dtype, options)
    ("structured", None, 2, 8, 64, torch.float32, dict(structured=True)),
    ("random_bf16_k8_H200", None, 8, 16, 200, torch.bfloat16, dict(minus_one=0.2)),
    ("k1_fp32", None, 1, 4, 136, torch.float32, {}),
    ("skew_expert0", None, 3, 8, 128, torch.bfloat16, dict(skew=True)),
    ("rank1_empty", "rank1_empty", 4, 8, 72, torch.float32, dict(minus_one=0.3)),
    ("all_minus_one", None, 2, 8, 64, torch.bfloat16, dict(minus_one=1.0)),
    ("k5_k6_k7", None, 6, 12, 40, torch.float32, dict(minus_one=0.1)),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dispatch_combine_bitexact(comm, engine, case):
    need_ranks(comm, 2)
    name, tokens, k, experts, hidden, dtype, opts = case
    world, rank = comm.Get_size(), comm.Get_rank()
    tokens = [5 + 3 * r if tokens is None else (0 if r == 1 else 9 + r) for r in range(world)]
    seed = 100 * len(name)
    xs, idxs, ws = inputs(world, seed, tokens, k, experts, hidden, dtype, **opts)
    want = ref.dispatch(xs, idxs, ws, experts)

    def body():
        group = fmo.comm.Group(comm)
        buf = fmo.moe.Buffer(group, hidden=hidden, num_experts=experts)
        with fmo.use_backend(engine):
            recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
            bitwise(recv_x, want[rank]["x"], f"recv_x ({name}, {engine}, seed {seed})")
            bitwise(recv_idx, want[rank]["topk_idx"], f"recv_topk_idx ({name})")
            bitwise(recv_w, want[rank]["topk_weights"], f"recv_topk_weights ({name})")
            assert tpe.tolist() == want[rank]["tokens_per_expert"].tolist(), (tpe, want[rank]["tokens_per_expert"])
            # Experts: any per-rank function of the received rows.
            ys = [(want[r]["x"].double() * (r + 1) + 0.25).to(dtype) for r in range(world)]
            out = buf.combine(ys[rank], handle)
            bitwise(out, ref.combine(ys, [w["src"] for w in want], tokens)[rank], f"combine ({name}, {engine})")
            again = buf.combine(ys[rank].clone(), handle)
            bitwise(again, out, "combine run twice")
        buf.destroy()
        return f"{tuple(recv_x.shape)} received"

    run_all(comm, body)


@pytest.mark.parametrize("engine", ENGINES)
def test_fp8_pairs_and_capacity(comm, engine):
    """(xq e4m3, xs fp32) pairs travel as they are; num_worst_tokens pads the outputs."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 300, 8, 3
    tokens = [6 + 2 * r for r in range(world)]
    xs, idxs, ws = inputs(world, 77, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.1)
    pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
    want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
    want_s = ref.dispatch([p[1] for p in pairs], idxs, ws, experts)
    cap = sum(tokens)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, num_worst_tokens=cap)
        with fmo.use_backend(engine):
            (rq, rs), ridx, rw, tpe, handle = buf.dispatch(pairs[rank], idxs[rank], ws[rank])
        n = want_q[rank]["x"].shape[0]
        assert rq.dtype == torch.float8_e4m3fn and rq.shape == (cap, hidden) and rs.shape == (cap, 3)
        bitwise(rq[:n].view(torch.uint8), want_q[rank]["x"], "recv xq")
        bitwise(rs[:n], want_s[rank]["x"], "recv xs")
        bitwise(ridx[:n], want_q[rank]["topk_idx"], "recv_topk_idx")
        assert bool((ridx[n:] == -1).all()) and bool((rw[n:] == 0).all()) and bool((rq[n:].view(torch.uint8) == 0).all())
        y = torch.ones(cap, hidden, dtype=torch.float32)
        with fmo.use_backend(engine):
            out = buf.combine(y, handle)      # padding rows are ignored
        sent_to = torch.tensor([[len({e // (experts // world) for e in row if e >= 0})] for row in idxs[rank].tolist()], dtype=torch.float32)
        bitwise(out, sent_to.expand(-1, hidden).contiguous(), "combine of ones counts the receiving ranks")
        buf.destroy()
        return n

    run_all(comm, body)


@pytest.mark.parametrize("engine", ENGINES)
def test_autograd_against_dense_float64(comm, engine):
    """grad x and grad topk_weights through dispatch -> experts -> combine, against the
    same model computed densely in one process in float64."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 24, 8, 3
    per = experts // world
    tokens = [4 + r for r in range(world)]
    xs, idxs, ws = inputs(world, 5, tokens, k, experts, hidden, torch.float64, minus_one=0.2)
    gs = [torch.randn(t, hidden, generator=torch.Generator().manual_seed(900 + s), dtype=torch.float64) for s, t in enumerate(tokens)]

    # Dense model: out[s][t] = sum over ranks r owning any expert of t of x * (r + 1) * (sum of t's weights on r).
    dx = [x.clone().requires_grad_() for x in xs]
    dw = [w.double().requires_grad_() for w in ws]
    loss = 0
    for s in range(world):
        for r in range(world):
            own = (idxs[s] >= r * per) & (idxs[s] < (r + 1) * per)
            wsum = torch.where(own, dw[s], 0.0).sum(1, keepdim=True)
            sent = own.any(1, keepdim=True)
            loss = loss + (torch.where(sent, dx[s] * (r + 1) * wsum, 0.0) * gs[s]).sum()
    loss.backward()

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts)
        x = xs[rank].clone().requires_grad_()
        w = ws[rank].clone().requires_grad_()
        with fmo.use_backend(engine):
            recv_x, recv_idx, recv_w, _, handle = buf.dispatch(x, idxs[rank], w)
            y = recv_x * (rank + 1) * recv_w.sum(1, keepdim=True).double()
            out = buf.combine(y, handle)
            (out * gs[rank]).sum().backward()
        err_x = (x.grad - dx[rank].grad).abs().max().item() if x.numel() else 0.0
        err_w = (w.grad.double() - dw[rank].grad).abs().max().item() if w.numel() else 0.0
        assert err_x < 1e-6 and err_w < 1e-4, f"grad x err {err_x}, grad w err {err_w}"
        buf.destroy()
        return f"grad errors {err_x:.1e} {err_w:.1e}"

    run_all(comm, body)


def test_errors_raised_alike_on_every_rank(comm):
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    group = fmo.comm.Group(comm)
    buf = fmo.moe.Buffer(group, hidden=32, num_experts=2 * world)
    x = torch.randn(4, 32)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.ones(4, 2)
    bad_idx = idx.clone()
    if rank == 1:
        bad_idx[2, 1] = 2 * world
    expect_same_error(comm, lambda: buf.dispatch(x, bad_idx, w), fmo.InputError,
                      f"dispatch refused on rank 1: topk_idx: expected expert ids in [-1, {2 * world}), got {2 * world}")
    expect_same_error(comm, lambda: buf.dispatch(x.to(torch.bfloat16) if rank == 1 else x, idx, w), fmo.InputError,
                      "x: dtype: expected the same value on every rank")
    expect_same_error(comm, lambda: buf.dispatch(torch.randn(4, 33) if rank == world - 1 else x, idx, w), fmo.InputError,
                      f"refused on rank {world - 1}: x: expected hidden size 32")
    expect_same_error(comm, lambda: fmo.moe.Buffer(group, hidden=32, num_experts=world + 1), fmo.InputError,
                      f"num_experts: expected a multiple of the group size {world}")
    expect_same_error(comm, lambda: fmo.moe.Buffer(group, hidden=32 + rank, num_experts=world), fmo.InputError,
                      "Buffer(hidden): expected the same value on every rank")
    small = fmo.moe.Buffer(group, hidden=32, num_experts=world, num_worst_tokens=3)
    expect_same_error(comm, lambda: small.dispatch(x, idx, w), fmo.InputError,
                      "rank 0 would receive")
    _, _, _, _, handle = buf.dispatch(x, idx, w)
    expect_same_error(comm, lambda: buf.combine(torch.zeros(handle.num_recv, 32), handle if rank else "not a handle"),
                      fmo.InputError, "combine refused on rank 0: handle: expected the Handle")
    expect_same_error(comm, lambda: buf.dispatch(x, idx.to("meta") if rank == 0 else idx, w), fmo.InputError,
                      "refused on rank 0: topk_idx: expected a CPU or CUDA tensor, got one on meta")
    # y on another device than its dispatch (e.g. CPU rows for a dispatch of CUDA tensors;
    # the meta device stands in for the other one here): refused, not read as host memory.
    elsewhere = dataclasses.replace(handle, combine_index=handle.combine_index.to("meta"))
    expect_same_error(comm, lambda: buf.combine(torch.zeros(handle.num_recv, 32), elsewhere if rank == world - 1 else handle),
                      fmo.InputError, f"combine refused on rank {world - 1}: y: expected a tensor on meta (where its dispatch ran)")
    # The buffers still work after refusing (nothing was exchanged but metadata).
    run_all(comm, lambda: buf.dispatch(x, idx, w)[0].shape)
    buf.destroy()
    small.destroy()
    expect_same_error(comm, lambda: buf.dispatch(x, idx, w), fmo.CommError, "this Buffer was destroyed")


def test_missing_rank_times_out_naming_it(comm, monkeypatch):
    """The last rank skips a dispatch: the others raise CommTimeoutError naming it after
    FMO_COMM_TIMEOUT; the stray messages stay on that Buffer's own communicator."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_COMM_TIMEOUT", "0.5")
    world, rank = comm.Get_size(), comm.Get_rank()
    buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=16, num_experts=world)
    if rank == world - 1:
        ok, detail = True, "skipped"
    else:
        t0 = time.monotonic()
        try:
            buf.dispatch(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1))
            ok, detail = False, "dispatch returned"
        except fmo.CommTimeoutError as e:
            ok, detail = f"rank(s) [{world - 1}]" in str(e) and time.monotonic() - t0 < 10, str(e)
    all_agree(comm, ok, detail)
    buf.destroy()
    # Everyone rejoins on a fresh Buffer.
    run_all(comm, lambda: fmo.moe.Buffer(fmo.comm.Group(comm), hidden=16, num_experts=world)
            .dispatch(torch.ones(2, 16), torch.zeros(2, 1, dtype=torch.int64), None)[0].shape)


def test_missing_payload_times_out_naming_the_rank(comm, monkeypatch):
    """The last rank passes the handshake but never moves its payload rows (its per-peer
    transfers are skipped): the others raise CommTimeoutError naming it, from the payload exchange
    itself, after FMO_COMM_TIMEOUT."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_COMM_TIMEOUT", "0.5")
    world, rank = comm.Get_size(), comm.Get_rank()
    buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=16, num_experts=world)
    # Token j to rank j: every rank waits for a row from the last one (a receive cannot
    # complete without its sender; a small send can, eagerly).
    x, idx = torch.randn(world, 16), torch.arange(world)[:, None]
    if rank == world - 1:
        monkeypatch.setattr(buf.group, "start_rows", lambda streams, what: fmo.comm.group._Rows([], [], [], what))
        buf.dispatch(x, idx, None)
        ok, detail = True, "skipped its transfers"
    else:
        t0 = time.monotonic()
        try:
            buf.dispatch(x, idx, None)
            ok, detail = False, "dispatch returned"
        except fmo.CommTimeoutError as e:
            ok, detail = f"rank(s) [{world - 1}]" in str(e) and "dispatch payload" in str(e) and time.monotonic() - t0 < 10, str(e)
    all_agree(comm, ok, detail)
    buf.destroy()
    run_all(comm, lambda: fmo.moe.Buffer(fmo.comm.Group(comm), hidden=16, num_experts=world)
            .dispatch(torch.ones(2, 16), torch.zeros(2, 1, dtype=torch.int64), None)[0].shape)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_use_does_not_grow_memory_and_gc_frees(comm):
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    xs, idxs, ws = inputs(world, 3, [64] * world, 4, 4 * world, 256, torch.float32)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=256, num_experts=4 * world)

        def step():
            recv_x, _, _, _, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
            buf.combine(recv_x, handle)
        for _ in range(5):
            step()
        gc.collect()
        before = rss_bytes()
        for _ in range(40):
            step()
        gc.collect()
        grown = rss_bytes() - before
        assert grown < 8 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 40 dispatch+combine"
        finalizer = buf._finalizer
        del buf
        gc.collect()
        assert not finalizer.alive, "an unreachable Buffer was not released"
        return f"grew {grown / 2**20:.2f} MiB"

    run_all(comm, body)


@pytest.mark.parametrize("engine", ENGINES)
def test_staged_path_bitexact(comm, engine, monkeypatch):
    """The path CUDA tensors take (layout, row gather and fixed-order sum as the kernels on
    the tensors' device, rows staged through host buffers around MPI), forced on CPU
    tensors: the "device" is the CPU, the kernels run on `engine`, the staging copies are
    host copies. Every case above, FP8 pairs and autograd, bit for bit as before; and under
    DeviceTags, with every tensor handed to the Buffer taken as a device tensor: the
    library never mixes them with tensors it made on the host where CUDA would refuse
    (a host tensor indexed by device ids, a device tensor given to MPI, ...)."""
    from device_tags import device_tags

    from fastmoe_ops.moe import host, kernels

    need_ranks(comm, 2)
    monkeypatch.setattr(host, "packed_on_device", lambda t: True)
    calls = {"gather_rows": 0, "gather_reduce": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counting(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(kernels, name, counting)
    with device_tags() as tags:
        buffer_inputs_on_device(monkeypatch, tags)
        for case in CASES:
            test_dispatch_combine_bitexact(comm, engine, case)
        test_fp8_pairs_and_capacity(comm, engine)
        test_autograd_against_dense_float64(comm, engine)
    all_agree(comm, calls["gather_rows"] > 0 and calls["gather_reduce"] > 0, f"device kernels called: {calls}")
    all_agree(comm, not tags.violations, tags.report())
