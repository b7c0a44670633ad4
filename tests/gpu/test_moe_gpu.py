"""fmo.moe.Buffer with CUDA tensors, on a GPU, across MPI ranks (one GPU may hold them all):

    mpirun -n 2 python -m pytest tests/gpu/test_moe_gpu.py -q -p no:cacheprovider

* host transport, staged: layout, row gather and fixed-order sum as the kernels on the
  device, rows through pinned host buffers around MPI; bit-exact against the oracle, the
  same bits as the CPU path, FP8 pairs and padding, autograd;
* transport='ipc' on the `cuda` engine: every rank's device buffer opened by every peer
  through CUDA IPC handles, the kernels of csrc/moe/ipc.cuh on exactly comm_sms CTAs on the
  transport's own stream; bit-exact against the oracle over repeated calls (the completion
  counters never reset), equal to the staged path, handles closed by destroy().

With one process (plain pytest) every test still runs with a world of one rank. Skipped,
with the reason, without a CUDA device, CuPy or mpi4py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import moe_ipc
from fastmoe_ops.reference import moe as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))   # the multi-rank helpers

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py not installed")
pytestmark = pytest.mark.skipif("cuda" not in fmo.available_backends(), reason="needs a CUDA device and CuPy")

from test_moe_dispatch import bitwise, inputs, run_all  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 256, 4), (torch.float32, 72, 3), (torch.float16, 200, 8)])
def test_staged_cuda_bitexact(comm, dtype, hidden, k):
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = 2 * world
    tokens = [(5 + 3 * r) if r != 1 else 0 for r in range(world)]
    xs, idxs, ws = inputs(world, 11, tokens, k, experts, hidden, dtype, minus_one=0.2)
    want = ref.dispatch(xs, idxs, ws, experts)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts)
        for _ in range(2):
            recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(xs[rank].to(DEV), idxs[rank].to(DEV), ws[rank].to(DEV))
            assert recv_x.device.type == "cuda" and recv_idx.device.type == "cuda" and tpe.device.type == "cuda"
            bitwise(recv_x.cpu(), want[rank]["x"], "staged recv_x")
            bitwise(recv_idx.cpu(), want[rank]["topk_idx"], "staged recv_topk_idx")
            bitwise(recv_w.cpu(), want[rank]["topk_weights"], "staged recv_topk_weights")
            assert tpe.cpu().tolist() == want[rank]["tokens_per_expert"].tolist()
            ys = [(want[r]["x"].double() * (r + 1) - 0.5).to(dtype) for r in range(world)]
            out = buf.combine(ys[rank].to(DEV), handle)
            assert out.device.type == "cuda"
            bitwise(out.cpu(), ref.combine(ys, [w["src"] for w in want], tokens)[rank], "staged combine")
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_staged_cuda_fp8_padding_and_autograd(comm):
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 300, 2 * world, 3
    tokens = [6 + 2 * r for r in range(world)]
    xs, idxs, ws = inputs(world, 77, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.1)
    pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
    want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
    cap = sum(tokens)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, num_worst_tokens=cap)
        pair = (pairs[rank][0].to(DEV), pairs[rank][1].to(DEV))
        (rq, rs), ridx, _, _, handle = buf.dispatch(pair, idxs[rank].to(DEV), ws[rank].to(DEV))
        n = want_q[rank]["x"].shape[0]
        assert rq.shape == (cap, hidden) and rq.device.type == "cuda"
        bitwise(rq[:n].cpu().view(torch.uint8), want_q[rank]["x"], "staged fp8 values")
        assert bool((ridx[n:] == -1).all()) and bool((rq[n:].view(torch.uint8) == 0).all())
        # Autograd through the staged path: the CPU path's results. out and grad x involve
        # only data movement, elementwise products and the fixed-order combine sums: bit for
        # bit. grad w also sums over the hidden dimension, in an order PyTorch picks per
        # device: fp32 rounding of a 300-term sum (relative 1e-5).
        grads = []
        for device in (DEV, torch.device("cpu")):
            x = xs[rank].float().to(device).requires_grad_()
            w = ws[rank].to(device).requires_grad_()
            recv_x, _, recv_w, _, h = buf.dispatch(x, idxs[rank].to(device), w)
            out = buf.combine(recv_x * recv_w[:, :1] * (rank + 2), h)
            (out * torch.arange(hidden, dtype=torch.float32, device=device)).sum().backward()
            grads.append((out.detach().cpu(), x.grad.cpu(), w.grad.cpu()))
        (out_g, gx_g, gw_g), (out_c, gx_c, gw_c) = grads
        bitwise(out_g, out_c, "cuda vs cpu: out")
        bitwise(gx_g, gx_c, "cuda vs cpu: grad x")
        err = ((gw_g - gw_c).abs() / gw_c.abs().clamp(min=1e-3)).max().item() if gw_c.numel() else 0.0
        assert err < 1e-5 and not gw_g.isnan().any(), f"cuda vs cpu: grad w relative error {err:.2e}"
        buf.destroy()
        return "ok"

    run_all(comm, body)


@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 256, 4), (torch.float32, 72, 3), (torch.bfloat16, 200, 8),
                                             (torch.float16, 136, 2)])
def test_ipc_cuda_bitexact_repeatable_and_closed(comm, dtype, hidden, k, monkeypatch):
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = 2 * world
    grids = []
    real_run = moe_ipc.run

    def recording_run(spec, params, grid, **kw):
        grids.append((grid, kw["engine"]))
        return real_run(spec, params, grid, **kw)

    monkeypatch.setattr(moe_ipc, "run", recording_run)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, transport="ipc",
                             max_tokens_per_rank=64, max_topk=8, device=DEV)
        staged = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts)
        with fmo.comm_sms(6):
            for call in range(3):          # counters accumulate across calls
                tokens = [(5 + 3 * r + call) if r != 1 or call != 1 else 0 for r in range(world)]
                xs, idxs, ws = inputs(world, 40 + call, tokens, k, experts, hidden, dtype, minus_one=0.2)
                want = ref.dispatch(xs, idxs, ws, experts)
                args = (xs[rank].to(DEV), idxs[rank].to(DEV), ws[rank].to(DEV))
                recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(*args)
                bitwise(recv_x.cpu(), want[rank]["x"], f"ipc recv_x (call {call})")
                bitwise(recv_idx.cpu(), want[rank]["topk_idx"], "ipc recv_topk_idx")
                bitwise(recv_w.cpu(), want[rank]["topk_weights"], "ipc recv_topk_weights")
                assert tpe.cpu().tolist() == want[rank]["tokens_per_expert"].tolist()
                ys = [(want[r]["x"].double() * (r + 1) - 0.5).to(dtype) for r in range(world)]
                out = buf.combine(ys[rank].to(DEV), handle)
                bitwise(out.cpu(), ref.combine(ys, [w["src"] for w in want], tokens)[rank], f"ipc combine (call {call})")
                _, _, _, _, h2 = staged.dispatch(*args)
                bitwise(staged.combine(ys[rank].to(DEV), h2).cpu(), out.cpu(), "ipc vs staged combine")
        assert grids == [(6, "cuda")] * 6, f"transport kernels must launch exactly comm_sms CTAs on cuda, got {grids}"
        ipc = buf._ipc
        buf.destroy()
        staged.destroy()
        assert ipc.peers == [] and not ipc.mapping._owned and not ipc.mapping._opened, "handles left open after destroy()"
        return "ok"

    run_all(comm, body)

