"""Quantising dispatch, `Buffer.dispatch(x, ..., use_fp8=True)`, across real MPI ranks, through
every transport: bf16/fp16/fp32 x goes out as e4m3 rows + per-1x128 fp32 scales, bit for bit
quantize_per_token_group(x) then dispatch (the oracle: every rank's pair quantised by the
reference, then the obvious gather of fastmoe_ops.reference.moe).

  mpi (host, CPU tensors; `sim` and `reference` engines): quantised by the op, then sent;
  mpi staged (CUDA's path forced on CPU tensors: layout and packing kernels on `sim`);
  ipc (sim over shared memory): quantised inside the dispatch kernel
      (moe_ipc_dispatch_fp8), under the simulator's memory checker once.
Outputs are poisoned (tests/conftest.py poisons every torch.empty). Also: padding rows with
num_worst_tokens, a rank sending nothing, hidden sizes that are not a multiple of 128, a pair
on one rank and use_fp8 on another (the same packed rows), the gradient through the FP8 rows'
anchor equal to a bf16 dispatch's, and bad input refused alike on every rank.
Run under `mpirun -n 2` (or more): ~10 s of the mpi step."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import moe_ipc
from fastmoe_ops.reference import fp8 as ref_fp8
from fastmoe_ops.reference import moe as ref

from mpi_util import (  # noqa: F401 (comm: a fixture)
    all_agree, bitwise, comm, expect_same_error, experts_for, inputs, need_ranks, run_all,
)

ENGINES = [e for e in ("sim", "reference") if e in fmo.available_backends()]
needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="the ipc transport runs on the sim engine here")


def oracle(xs, idxs, ws, experts):
    """Every rank's received (codes as bytes, scales) per the reference quantisation."""
    pairs = [ref_fp8.quantize_per_token_group(x, 128) for x in xs]
    return (ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts),
            ref.dispatch([p[1] for p in pairs], idxs, ws, experts))


def make_buffer(comm, transport, hidden, experts, k, **kw):
    extra = dict(transport="ipc", max_tokens_per_rank=32, max_topk=k) if transport == "ipc" else {}
    return fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, **extra, **kw)


def check(comm, transport, engine, dtype, hidden, k, tokens, seed, *, worst=0, launched=None):
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = experts_for(world, k)
    xs, idxs, ws = inputs(world, seed, tokens, k, experts, hidden, dtype, minus_one=0.2)
    xs = [x * torch.logspace(-2, 2, x.shape[0], dtype=x.dtype)[:, None] if x.shape[0] else x for x in xs]   # scales differ
    want_q, want_s = oracle(xs, idxs, ws, experts)
    buf = make_buffer(comm, transport, hidden, experts, k, num_worst_tokens=worst)
    with fmo.use_backend(engine):
        (rq, rs), ridx, rw, tpe, _ = buf.dispatch(xs[rank], idxs[rank], ws[rank], use_fp8=True)
    buf.destroy()
    n = want_q[rank]["x"].shape[0]
    rows = worst or n
    groups = -(-hidden // 128)
    assert rq.dtype == torch.float8_e4m3fn and rq.shape == (rows, hidden) and rs.dtype == torch.float32 and rs.shape == (rows, groups)
    where = f"{transport}/{engine} {dtype} H {hidden} k {k} seed {seed}"
    bitwise(rq[:n].view(torch.uint8), want_q[rank]["x"], f"codes ({where})")
    bitwise(rs[:n], want_s[rank]["x"], f"scales ({where})")
    bitwise(ridx[:n], want_q[rank]["topk_idx"], f"recv_topk_idx ({where})")
    bitwise(rw[:n], want_q[rank]["topk_weights"], f"recv_topk_weights ({where})")
    assert tpe.tolist() == want_q[rank]["tokens_per_expert"].tolist()
    if rows > n:
        assert bool((rq[n:].view(torch.uint8) == 0).all()) and bool((rs[n:] == 0).all()) and bool((ridx[n:] == -1).all())
    return n


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 256, 4), (torch.float32, 200, 2), (torch.float16, 72, 3)])
def test_host_transport_bitexact(comm, engine, dtype, hidden, k):
    need_ranks(comm, 2)
    world = comm.Get_size()
    tokens = [0 if r == 1 else 5 + 3 * r for r in range(world)]   # rank 1 sends nothing
    run_all(comm, lambda: check(comm, "host", engine, dtype, hidden, k, tokens, 11 + hidden, worst=sum(tokens) + 3))


@needs_sim
def test_host_staged_path_bitexact(comm, monkeypatch):
    """CUDA's host path (quantised on the device, packed by the kernels, staged around MPI)
    forced on CPU tensors with the sim engine."""
    from fastmoe_ops.moe import host

    need_ranks(comm, 2)
    monkeypatch.setattr(host, "packed_on_device", lambda t: True)
    world = comm.Get_size()
    run_all(comm, lambda: check(comm, "host", "sim", torch.bfloat16, 384, 3, [4 + 5 * r for r in range(world)], 21))


@needs_sim
@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 384, 4), (torch.float32, 200, 3), (torch.bfloat16, 136, 2)])
def test_ipc_quantises_in_the_kernel_bitexact(comm, monkeypatch, dtype, hidden, k):
    """The dispatch kernel quantises (no quantisation op runs, the fp8 kernel launches)."""
    from fastmoe_ops.moe.transports import mpi as mpi_transport

    need_ranks(comm, 2)
    world = comm.Get_size()
    launched = []
    real_run = moe_ipc.run

    def recording_run(spec, params, grid, **kw):
        launched.append(type(spec).__name__)
        return real_run(spec, params, grid, **kw)

    def no_quantise(*a, **kw):
        raise AssertionError("the ipc path must not quantise before sending")

    monkeypatch.setattr(moe_ipc, "run", recording_run)
    monkeypatch.setattr(mpi_transport, "quantize_per_token_group", no_quantise)

    def body():
        for call, tokens in enumerate(([3 + 4 * r for r in range(world)], [0] + [9] * (world - 1))):
            check(comm, "ipc", "sim", dtype, hidden, k, tokens, 31 + call, worst=40 if call else 0)
        assert launched == ["MoeIpcDispatchFp8Spec"] * 2, launched
        return "ok"

    run_all(comm, body)


@needs_sim
def test_ipc_fp8_dispatch_under_memcheck_scalar_path(comm, monkeypatch):
    """hidden 100: not a multiple of 8 (the scalar x loads) nor of 128 (a partial group)."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    world = comm.Get_size()
    run_all(comm, lambda: check(comm, "ipc", "sim", torch.bfloat16, 100, 2, [6 + r for r in range(world)], 41))


@needs_sim
@pytest.mark.parametrize("transport", ["host", "ipc"])
def test_pair_on_one_rank_use_fp8_on_another(comm, transport):
    """The rows on the wire are the FP8 pair's either way: ranks may mix the two."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, k = 256, 2
    experts = experts_for(world, k)
    xs, idxs, ws = inputs(world, 51, [7] * world, k, experts, hidden, torch.bfloat16)
    want_q, want_s = oracle(xs, idxs, ws, experts)

    def body():
        buf = make_buffer(comm, transport, hidden, experts, k)
        with fmo.use_backend("sim"):
            if rank % 2:
                got = buf.dispatch(fmo.fp8.quantize_per_token_group(xs[rank]), idxs[rank], ws[rank])
            else:
                got = buf.dispatch(xs[rank], idxs[rank], ws[rank], use_fp8=True)
        buf.destroy()
        bitwise(got[0][0].view(torch.uint8), want_q[rank]["x"], "codes")
        bitwise(got[0][1], want_s[rank]["x"], "scales")
        return "ok"

    run_all(comm, body)


@pytest.mark.parametrize("transport", ["host", "ipc"])
def test_gradient_through_the_anchor_equals_bf16_dispatch(comm, transport):
    """recv_x.grad_anchor carries d loss / d recv_x back: the combine of dispatch's backward,
    bit for bit the bf16 dispatch's gradient for the same upstream gradient; topk_weights'
    gradient too."""
    if transport == "ipc" and "sim" not in fmo.available_backends():
        pytest.skip("the ipc transport runs on the sim engine here")
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, k = 128, 3
    experts = experts_for(world, k)
    xs, idxs, ws = inputs(world, 61, [5 + r for r in range(world)], k, experts, hidden, torch.float32, minus_one=0.2)

    def grads(use_fp8):
        buf = make_buffer(comm, transport, hidden, experts, k)
        x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        with fmo.use_backend("sim" if "sim" in fmo.available_backends() else "reference"):
            recv_x, _, recv_w, _, _ = buf.dispatch(x, idxs[rank], w, use_fp8=use_fp8)
            if use_fp8:
                assert recv_x.grad_anchor is not None and recv_x.grad_anchor.shape == recv_x[0].shape
                rows = recv_x.grad_anchor + ref_fp8.dequantize_per_token_group(*recv_x).float()
            else:
                rows = recv_x
            g = torch.arange(rows.numel(), dtype=torch.float32).reshape(rows.shape) % 7 - 3
            ((rows * g).sum() + (recv_w * recv_w).sum()).backward()
        buf.destroy()
        return x.grad, w.grad

    def body():
        for a, b, what in zip(grads(True), grads(False), ("grad x", "grad w")):
            bitwise(a, b, f"use_fp8 vs bf16 dispatch on {transport}: {what}")
        return "ok"

    run_all(comm, body)


@pytest.mark.parametrize("bad, fragment", [
    ("fp64", "x: expected dtype in ['torch.bfloat16', 'torch.float16', 'torch.float32']"),
    ("pair", "use_fp8: expected a bool, False when x is already an FP8 pair"),
    ("not_bool", "use_fp8: expected a bool"),
])
def test_bad_input_refused_alike(comm, bad, fragment):
    """One rank's bad call is refused on every rank, before anything is sent."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = 2 * world
    buf = make_buffer(comm, "host", 256, experts, 2)
    x = torch.randn(4, 256)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    idx[:, 1] = 1
    kw = {"use_fp8": True}
    if rank == world - 1:
        if bad == "fp64":
            x = x.double()
        elif bad == "pair":
            x = fmo.fp8.quantize_per_token_group(x)
        else:
            kw = {"use_fp8": 1}
    expect_same_error(comm, lambda: buf.dispatch(x, idx, None, **kw), fmo.InputError,
                      f"dispatch refused on rank {world - 1}: {fragment}")
    # The Buffer still works after a refusal.
    with fmo.use_backend("sim" if "sim" in fmo.available_backends() else "reference"):
        (rq, rs), *_ = buf.dispatch(torch.ones(4, 256), idx, None, use_fp8=True)
    all_agree(comm, bool((rq.float() == 448).all()) and bool((rs == 1 / 448).all()), "dispatch after a refusal")
    buf.destroy()
