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

from mpi_util import (  # noqa: F401 (comm: a fixture)
    all_agree, buffer_inputs_on_device, comm, expect_same_error, inputs, need_ranks, run_all,
)

from moe_dispatch_util import (CASES, ENGINES, check_autograd_against_dense_float64, check_dispatch_combine_bitexact,
                               check_fp8_pairs_and_capacity)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dispatch_combine_bitexact(comm, engine, case):
    check_dispatch_combine_bitexact(comm, engine, case)


@pytest.mark.parametrize("engine", ENGINES)
def test_fp8_pairs_and_capacity(comm, engine):
    """(xq e4m3, xs fp32) pairs travel as they are; num_worst_tokens pads the outputs."""
    check_fp8_pairs_and_capacity(comm, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_autograd_against_dense_float64(comm, engine):
    """grad x and grad topk_weights through dispatch -> experts -> combine, against the
    same model computed densely in one process in float64."""
    check_autograd_against_dense_float64(comm, engine)


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
