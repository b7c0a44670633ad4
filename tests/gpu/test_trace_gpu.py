"""The kernel trace (FMO_TRACE=1) on CUDA: two rendezvous kernels on a "comm" and a
"compute" CUDA stream each finish only if the other runs at the same time, and the trace
shows them in flight together. The CPU cases: tests/test_trace.py."""
from __future__ import annotations

import torch

import fastmoe_ops.streams as fs
import fastmoe_ops.trace as ft

from gpu_util import needs_cuda

pytestmark = needs_cuda


def test_cuda_comm_and_compute_kernels_intersect(tracing):
    flags = torch.zeros(2, dtype=torch.int32, device="cuda")
    met = torch.zeros(2, dtype=torch.int32, device="cuda")
    comm, compute = fs.Stream("cuda", role="comm"), fs.Stream("cuda", role="compute")
    pa = comm.submit(ft.rendezvous, flags, met, 0, timeout_s=5.0, engine="cuda")
    pb = compute.submit(ft.rendezvous, flags, met, 1, timeout_s=5.0, engine="cuda")
    comm.synchronize(), compute.synchronize()
    pa.result(), pb.result()
    assert met.tolist() == [1, 1], f"rendezvous outcome {met.tolist()} (2 = timed out waiting for the other stream)"
    ivs = ft.collect()
    assert {(i.role, i.engine) for i in ivs} == {("comm", "cuda"), ("compute", "cuda")}
    assert ft.in_flight_together(ivs, "comm", "compute")
