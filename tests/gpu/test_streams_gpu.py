"""fastmoe_ops.streams on CUDA streams: work on a "comm" stream ordered before a "compute"
stream's by `wait` alone (no host synchronisation). The CPU cases: tests/test_streams.py."""
from __future__ import annotations

import torch

import fastmoe_ops.streams as fs

from gpu_util import needs_cuda

pytestmark = needs_cuda


def test_cuda_stream_orders_without_host_sync():
    a, b = fs.Stream("cuda", role="comm"), fs.Stream("cuda", role="compute")
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    pa = a.submit(lambda: (x * 2, fs.current_role()))
    b.wait(pa)
    pb = b.submit(lambda: pa.result()[0] + 1)
    y, role = pa.result()
    assert role == "comm"
    assert torch.equal(pb.result().cpu(), (x * 2 + 1).cpu())
