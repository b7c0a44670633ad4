"""fmo.moe with CUDA tensors, on a GPU, across MPI ranks (one GPU may hold them all):

    mpirun -n 2 python -m pytest tests/gpu/test_moe_gpu.py -q -p no:cacheprovider

* host transport, staged: layout, row gather and fixed-order sum as the kernels on the
  device, rows through pinned host buffers around MPI; bit-exact against the oracle, the
  same bits as the CPU path, FP8 pairs and padding, fp64 (the host sum), a rank (or, in
  one process, the whole world) without tokens, autograd;
* transport='ipc' on the `cuda` engine: every rank's device buffer opened by every peer
  through CUDA IPC handles (ranks sharing one GPU included: a handle opened by another
  process on the same device is allowed; a rank never opens its own), the kernels of
  csrc/moe/ipc.cuh on exactly comm_sms CTAs on the transport's own stream; bit-exact
  against the oracle over repeated calls (the completion counters never reset), equal to
  the staged path, handles closed by destroy();
* permute / unpermute on the device (forward and backward, FP8 pairs, fp64, no rows) equal
  to the CPU's bits.

Every CUDA tensor made with torch.empty starts as NaN (gpu_util.poison_cuda_allocations), so
a row the transport forgets to write fails. With one process (plain pytest) every test still
runs, with a world of one rank. Skipped,
with the reason, without a CUDA device, CuPy or mpi4py. Every rank builds every rank's
inputs from (seed + rank) on the CPU and moves its own to the GPU; the oracle runs on the CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import moe_ipc
from fastmoe_ops.reference import moe as ref

from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))   # the multi-rank helper module
from mpi_util import bitwise, comm, experts_for, inputs, run_all  # noqa: E402, F401 (comm: a fixture)

pytestmark = needs_cuda


def to_dev(*tensors):
    return [t.to(DEV) if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 256, 4), (torch.float32, 72, 3), (torch.float16, 200, 8),
                                             (torch.float64, 40, 2)])
def test_staged_cuda_bitexact(comm, dtype, hidden, k):
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = experts_for(world, k)
    # Call 0: rank 1 sends nothing; call 1: rank 0 sends nothing (one process: nobody does).
    calls = [[0 if r == 1 else 5 + 3 * r for r in range(world)], [0 if r == 0 else 4 + r for r in range(world)]]

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts)
        for call, tokens in enumerate(calls):
            xs, idxs, ws = inputs(world, 11 + call, tokens, k, experts, hidden, dtype, minus_one=0.2)
            want = ref.dispatch(xs, idxs, ws, experts)
            recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(*to_dev(xs[rank], idxs[rank], ws[rank]))
            assert {t.device.type for t in (recv_x, recv_idx, recv_w, tpe)} == {"cuda"}, "outputs left the device"
            what = f"(call {call}, {dtype})"
            bitwise(recv_x.cpu(), want[rank]["x"], f"staged recv_x {what}")
            bitwise(recv_idx.cpu(), want[rank]["topk_idx"], f"staged recv_topk_idx {what}")
            bitwise(recv_w.cpu(), want[rank]["topk_weights"], f"staged recv_topk_weights {what}")
            assert tpe.cpu().tolist() == want[rank]["tokens_per_expert"].tolist(), f"tokens_per_expert {what}"
            ys = [(want[r]["x"].double() * (r + 1) - 0.5).to(dtype) for r in range(world)]
            out = buf.combine(ys[rank].to(DEV), handle)
            assert out.device.type == "cuda"
            bitwise(out.cpu(), ref.combine(ys, [w["src"] for w in want], tokens)[rank], f"staged combine {what}")
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_staged_cuda_fp8_padding_and_autograd(comm):
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, k = 300, 3
    experts = experts_for(world, k)
    tokens = [6 + 2 * r for r in range(world)]
    xs, idxs, ws = inputs(world, 77, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.1)
    pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
    want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
    cap = sum(tokens)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, num_worst_tokens=cap)
        (rq, rs), ridx, _, _, handle = buf.dispatch(tuple(to_dev(*pairs[rank])), *to_dev(idxs[rank], ws[rank]))
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
        with pytest.raises(fmo.InputError, match="y: expected a tensor on cuda"):   # refused on every rank alike
            buf.combine(torch.zeros(handle.num_recv_rows, hidden), handle)
        buf.destroy()
        return "ok"

    run_all(comm, body)


@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 256, 4), (torch.float32, 72, 3), (torch.bfloat16, 200, 8),
                                             (torch.float16, 136, 2)])
def test_ipc_cuda_bitexact_repeatable_and_closed(comm, dtype, hidden, k, monkeypatch):
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = experts_for(world, k)
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
                args = to_dev(xs[rank], idxs[rank], ws[rank])
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
        ipc = buf._transport
        assert len(ipc.mapping._opened) == world - 1, "a rank opens every peer's handle and never its own"
        buf.destroy()
        staged.destroy()
        assert ipc.peers == [] and not ipc.mapping._owned and not ipc.mapping._opened, "handles left open after destroy()"
        return "ok"

    run_all(comm, body)


@pytest.mark.parametrize("transport", ["host", "ipc"])
@pytest.mark.parametrize("dtype, hidden", [(torch.bfloat16, 7168), (torch.float32, 200)])
def test_use_fp8_dispatch_cuda_bitexact(comm, transport, dtype, hidden, monkeypatch):
    """dispatch(x, use_fp8=True) on CUDA: quantised in the ipc kernel (moe_ipc_dispatch_fp8) or
    by quantize_per_token_group before the staged send; bit for bit the reference's
    quantisation then the gather (tests/mpi/test_moe_dispatch_fp8.py on the CPU)."""
    from fastmoe_ops.reference import fp8 as ref_fp8

    world, rank = comm.Get_size(), comm.Get_rank()
    k = 8 if world * 2 >= 8 else 2
    experts = experts_for(world, k)
    launched = []
    real_run = moe_ipc.run

    def recording_run(spec, params, grid, **kw):
        launched.append(type(spec).__name__)
        return real_run(spec, params, grid, **kw)

    monkeypatch.setattr(moe_ipc, "run", recording_run)

    def body():
        extra = dict(transport="ipc", max_tokens_per_rank=128, max_topk=8, device=DEV) if transport == "ipc" else {}
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, **extra)
        tokens = [100 + 7 * r for r in range(world)]
        xs, idxs, ws = inputs(world, 81, tokens, k, experts, hidden, dtype, minus_one=0.2)
        pairs = [ref_fp8.quantize_per_token_group(x, 128) for x in xs]
        want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
        want_s = ref.dispatch([p[1] for p in pairs], idxs, ws, experts)
        (rq, rs), ridx, rw, _, _ = buf.dispatch(*to_dev(xs[rank], idxs[rank], ws[rank]), use_fp8=True)
        bitwise(rq.cpu().view(torch.uint8), want_q[rank]["x"], f"{transport} use_fp8 codes")
        bitwise(rs.cpu(), want_s[rank]["x"], f"{transport} use_fp8 scales")
        bitwise(ridx.cpu(), want_q[rank]["topk_idx"], f"{transport} use_fp8 recv_topk_idx")
        assert launched == (["MoeIpcDispatchFp8Spec"] if transport == "ipc" else []), launched
        buf.destroy()
        return "ok"

    run_all(comm, body)


@pytest.mark.parametrize("dtype, rows, fp8", [(torch.bfloat16, 300, False), (torch.float64, 70, False),
                                              (torch.float32, 90, True), (torch.bfloat16, 0, False)])
def test_permute_unpermute_cuda_equals_cpu(dtype, rows, fp8):
    """The layer's regrouping on the device, forward and backward, against the same calls on
    the CPU (the default engine, sim: the same kernels), bit for bit; fp64 takes the PyTorch fallback on
    both, no rows the layout's fallback. The first H200 run stopped here (a host offsets
    table indexed by device ids)."""
    k, experts, hidden = 4, 6, 256
    g = torch.Generator().manual_seed(rows + 1)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(rows)]) if rows else torch.zeros(0, k, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w, dy = torch.rand(rows, k, generator=g), torch.randn(rows, hidden, generator=g)
    results = []
    for device in (DEV, torch.device("cpu")):
        xi = tuple(t.to(device) for t in fmo.fp8.quantize_per_token_group(x, 128)) if fp8 else x.to(device).requires_grad_()
        wi = w.to(device).requires_grad_()
        xs, pmap = fmo.moe.permute(xi, idx.to(device), experts, alignment=fmo.fp8.contiguous_alignment())
        rows_sorted = xs[1].repeat_interleave(128, 1) * xs[0].float() if fp8 else xs * 2
        out = fmo.moe.unpermute(rows_sorted, pmap, wi)
        (out * dy.to(device, out.dtype)).sum().backward()
        results.append([out.detach(), wi.grad] + ([] if fp8 else [xi.grad]) + [pmap.slot_rows, pmap.expert_offsets])
    for i, (a, b) in enumerate(zip(*results)):
        assert a.device.type == "cuda", f"result {i} left the device"
        what = f"permute/unpermute result {i} ({dtype}, {rows} rows{', fp8' if fp8 else ''})"
        if i == 1:   # grad w: a sum over the hidden dimension, in an order PyTorch picks per device
            err = ((a.cpu() - b).abs() / b.abs().clamp(min=1e-3)).max().item() if b.numel() else 0.0
            assert err < 1e-5 and not a.isnan().any(), f"{what}: relative error {err:.2e}"
        else:
            bitwise(a.cpu(), b, what)


def test_ipc_static_path_captured_in_a_cuda_graph(comm):
    """Issue 17: transport='ipc' with num_worst_tokens (the static path, fastmoe_ops.moe.static:
    counts exchanged on the device) captured by torch.cuda.graph under
    torch.cuda.set_sync_debug_mode("error"), dispatch then combine; replays on new inputs
    (every rank replays alike: the kernels' counter targets come from a device word) equal
    an eager call bit for bit, and the eager call the oracle (valid rows; padding rows zero,
    topk_idx -1, weight 0). Buffer.check() reports nothing afterwards."""
    from gpu_util import capture_replay_check

    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, k = 256, 2
    experts = experts_for(world, k)
    tokens = [7 + 2 * r for r in range(world)]
    cap = sum(tokens)
    sets = [inputs(world, 60 + i, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.1) for i in range(2)]

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, num_worst_tokens=cap,
                             transport="ipc", max_tokens_per_rank=32, max_topk=k, device=DEV)

        def step(x, idx, w):
            recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(x, idx, w)
            return recv_x, recv_idx, recv_w, tpe, buf.combine(recv_x * 2, handle)

        static_in, fresh = ([t.to(DEV) for t in (xs[rank], idxs[rank], ws[rank])] for xs, idxs, ws in sets)
        capture_replay_check("ipc num_worst_tokens dispatch + combine", step, static_in, fresh, 60)
        xs, idxs, ws = sets[1]
        want = ref.dispatch(xs, idxs, ws, experts)
        recv_x, recv_idx, recv_w, tpe, out = (t.cpu() for t in step(*fresh))
        buf.check()
        n = want[rank]["x"].shape[0]
        bitwise(recv_x[:n], want[rank]["x"], "static ipc recv_x")
        bitwise(recv_idx[:n], want[rank]["topk_idx"], "static ipc recv_topk_idx")
        bitwise(recv_w[:n], want[rank]["topk_weights"], "static ipc recv_topk_weights")
        assert bool((recv_x[n:] == 0).all()) and bool((recv_idx[n:] == -1).all()) and bool((recv_w[n:] == 0).all())
        assert tpe.tolist() == want[rank]["tokens_per_expert"].tolist()
        ys = [(want[r]["x"].double() * 2).to(torch.bfloat16) for r in range(world)]
        bitwise(out, ref.combine(ys, [w["src"] for w in want], tokens)[rank], "static ipc combine")
        buf.destroy()
        return "ok"

    run_all(comm, body)
