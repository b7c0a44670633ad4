"""Proof of overlap: fmo.nn.MoELayer(overlap=True) with transport='ipc' on the `sim` engine,
so the communication is kernels (exactly comm_sms CTAs each) on the comm stream while the
expert GEMMs run on the compute stream. With FMO_TRACE=1 every CTA records its start and end;
the test asserts, on every rank, that a communication kernel and a compute kernel were in
flight at the same time, in the forward and again in the backward (kernel intervals only: host intervals are excluded), that each
communication kernel held exactly comm_sms CTAs, and that the overlapped layer returns the
same output and input gradient bit for bit as the same layer run sequentially.

Run: mpirun -n 4 python -m pytest tests/mpi/test_overlap.py (tiny shapes: 4 ranks share 2
cores in CI). On a GPU, test_cuda_comm_and_compute_kernels_intersect gives the same proof for
both transports (mpirun -n 2 with both ranks on one GPU, or one process)."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
import fastmoe_ops.trace as ft

from mpi_util import comm, need_ranks, run_all  # noqa: F401 (comm: a fixture)

H, I, E, K, T, COMM_SMS = 128, 128, 8, 2, 24, 4
ATTEMPTS = 3


def layer_step(group, overlap, seed, traces=None):
    """One forward + backward; with `traces` (a dict), the forward's and the backward's
    kernel intervals are collected separately into it."""
    torch.manual_seed(seed)                       # same weights on every rank
    layer = fmo.nn.MoELayer(H, I, E, K, group=group, overlap=overlap, transport="ipc", max_tokens_per_rank=T,
                            dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1 + group.rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, generator=g).to(torch.bfloat16)
    if traces is not None:
        ft.clear()
    out = layer(x)
    if traces is not None:
        traces["forward"] = [iv for iv in ft.collect() if iv.engine == "sim"]
        ft.clear()
    out.backward(dy)
    if traces is not None:
        traces["backward"] = [iv for iv in ft.collect() if iv.engine == "sim"]
    layer.destroy()
    return out.detach(), x.grad


def test_comm_and_compute_kernels_in_flight_together(comm, monkeypatch):
    need_ranks(comm, 4)
    monkeypatch.setenv("FMO_TRACE", "1")
    group = fmo.comm.Group(comm)

    def body():
        # A loaded machine (4 ranks on 2 shared cores) may happen to serialise one step's
        # stages, so each phase gets up to ATTEMPTS steps to show an overlap; the first step
        # (also the one compared with the sequential layer) usually does.
        seen = {"forward": False, "backward": False}
        with fmo.use_backend("sim"), fmo.comm_sms(COMM_SMS):
            out_seq, dx_seq = layer_step(group, False, 7)
            for attempt in range(ATTEMPTS):
                comm.Barrier()
                traces = {}
                out, dx = layer_step(group, True, 7, traces)
                if attempt == 0:
                    out_ovl, dx_ovl, first = out, dx, traces
                for phase, kernels in traces.items():
                    seen[phase] |= ft.in_flight_together(kernels, "comm", "compute")
                if all(comm.allgather(all(seen.values()))):   # the same number of steps on every rank
                    break
        assert all(seen.values()), \
            f"no communication kernel ran while a compute kernel did in {[p for p, v in seen.items() if not v]} " \
            f"(rank {group.rank}, {ATTEMPTS} steps)"
        traces = first
        kernels = traces["forward"] + traces["backward"]
        roles = {iv.role for iv in kernels}
        assert {"comm", "compute"} <= roles, f"traced kernel roles {sorted(roles)}: expected comm and compute"
        comm_grids = {}
        for iv in kernels:
            if iv.role == "comm":
                comm_grids.setdefault((iv.launch_id, iv.name), set()).add(iv.cta)
        bad = {k: len(v) for k, v in comm_grids.items() if len(v) != COMM_SMS}
        assert comm_grids and not bad, f"communication kernels must hold exactly comm_sms={COMM_SMS} CTAs: {bad}"
        frac = ft.overlapped_fraction(kernels, "comm", "compute")
        assert torch.equal(out_seq.view(torch.int16), out_ovl.view(torch.int16)), "out: overlap != sequential"
        assert torch.equal(dx_seq.view(torch.int16), dx_ovl.view(torch.int16)), "dx: overlap != sequential"
        return f"overlapped fraction {frac:.2f}"

    run_all(comm, body)


@pytest.mark.parametrize("transport", ["host", "ipc"])
def test_cuda_comm_and_compute_kernels_intersect(comm, monkeypatch, transport):
    """The same proof on a GPU, for both transports, every rank on device 0 (ranks sharing
    it, as `mpirun -n 2` on one GPU does; one process works too: its dispatch and combine
    still run kernels): host, the staged path's layout/gather/sum kernels on the comm
    stream; ipc, the CUDA IPC transport kernels (exactly comm_sms CTAs, on the transport's
    stream, submitted from the comm stream). Some communication kernel's CTA interval
    intersects some expert-GEMM CTA interval (both %globaltimer, one clock) in one of up to
    ATTEMPTS steps, and the overlapped layer equals the sequential one bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (test_comm_and_compute_kernels_in_flight_together is the CPU proof)")
    monkeypatch.setenv("FMO_TRACE", "1")
    monkeypatch.setenv("FMO_TRACE_CAPACITY", str(1 << 20))   # a step of this layer: tens of thousands of CTAs
    torch.cuda.set_device(0)
    group = fmo.comm.Group(comm)
    hidden, inter, tokens, k = 1024, 1024, 2048, 4
    extra = dict(transport="ipc", max_tokens_per_rank=tokens) if transport == "ipc" else {}

    def body():
        results, seen = {}, False
        for overlap in (False, True):
            torch.manual_seed(7)
            layer = fmo.nn.MoELayer(hidden, inter, 8 * group.size, k, group=group, overlap=overlap, dtype=torch.bfloat16,
                                    device="cuda", **extra)
            g = torch.Generator().manual_seed(8 + group.rank)
            x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).cuda().requires_grad_()
            dy = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).cuda()
            layer(x).backward(dy)                     # warm-up: compiles the traced kernels
            for attempt in range(ATTEMPTS if overlap else 1):
                x.grad = None
                comm.Barrier()
                ft.clear()
                out = layer(x)
                out.backward(dy)
                kernels = [iv for iv in ft.collect() if iv.engine == "cuda"]
                if attempt == 0:
                    results[overlap] = (out.detach().cpu(), x.grad.cpu(), kernels)
                seen = seen or (overlap and ft.in_flight_together(kernels, "comm", "compute"))
                if overlap and all(comm.allgather(seen)):   # the same number of steps on every rank
                    break
            layer.destroy()
        kernels = results[True][2]
        assert {"comm", "compute"} <= {iv.role for iv in kernels}, f"traced roles {sorted({iv.role for iv in kernels})}"
        assert seen, f"no communication kernel ran while a compute kernel did ({transport}, rank {group.rank}, " \
                     f"{ATTEMPTS} steps, {len(kernels)} CTA intervals in the first)"
        for i, name in enumerate(("out", "dx")):
            assert torch.equal(results[False][i].view(torch.int16), results[True][i].view(torch.int16)), \
                f"{name}: overlap != sequential on the GPU ({transport})"
        return f"overlapped fraction {ft.overlapped_fraction(kernels, 'comm', 'compute'):.2f}"

    run_all(comm, body)
