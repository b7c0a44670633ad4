"""Low-latency dispatch + combine (Buffer(transport='ipc', low_latency=True)) on CUDA, under
mpirun (one GPU may hold every rank): captured in a CUDA graph and replayed with new inputs
copied into the captured tensors; every replay checked against the plain dispatch's oracle
(rows per expert in receive order, masked_m exact) and the fixed-order combine, bit for bit.

    mpirun -n 2 python -m pytest tests/gpu/test_moe_low_latency_gpu.py -q -p no:cacheprovider
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import moe as ref

from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))   # the multi-rank helper module
from mpi_util import bitwise, comm, inputs, run_all  # noqa: E402, F401 (comm: a fixture)

pytestmark = needs_cuda


def test_low_latency_cuda_graph_replay(comm):
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, k, tokens, max_tokens = 512, 8, 128, 128
    experts, per = 8 * world, 8

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, transport="ipc",
                             max_tokens_per_rank=max_tokens, max_topk=k, low_latency=True, device=DEV)
        xs, idxs, ws = inputs(world, 3, [tokens] * world, k, experts, hidden, torch.bfloat16, minus_one=0.1)
        x, idx, w = xs[rank].to(DEV), idxs[rank].to(DEV), ws[rank].to(DEV)
        recv, masked_m, handle = buf.low_latency_dispatch(x, idx, w)        # eager: compiles, warms up
        buf.low_latency_combine(recv, handle)
        torch.cuda.synchronize()
        comm.Barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            recv, masked_m, handle = buf.low_latency_dispatch(x, idx, w)
            y = recv * 2
            out = buf.low_latency_combine(y, handle)
        for replay in range(3):
            xs, idxs, ws = inputs(world, 10 + replay, [tokens] * world, k, experts, hidden, torch.bfloat16, minus_one=0.1)
            x.copy_(xs[rank]), idx.copy_(idxs[rank]), w.copy_(ws[rank])
            comm.Barrier()
            graph.replay()
            torch.cuda.synchronize()
            buf.low_latency_check()
            want = ref.dispatch(xs, idxs, ws, experts)
            got_m = masked_m.cpu()
            for e in range(per):
                rows = want[rank]["x"][(want[rank]["topk_idx"] == e).any(1)]
                assert int(got_m[e]) == rows.shape[0], f"replay {replay}: masked_m[{e}]"
                bitwise(recv[e, :rows.shape[0]].cpu(), rows, f"replay {replay}: expert {e}")
            ys = comm.allgather((recv.cpu().double() * 2).to(torch.bfloat16))
            bitwise(out.cpu(), ref.low_latency_combine(ys, idxs, ws, experts)[rank], f"replay {replay}: combine")
        buf.destroy()
        return "ok"

    run_all(comm, body)
