"""No host synchronisation on the ops' hot paths, checked on the CPU.

On a GPU a host read of device memory (.item(), .tolist(), bool(t), a copy to the CPU)
waits for the stream and is illegal inside a CUDA-graph capture. The `sim` engine runs the
same launcher code as `cuda` (validation, heuristics, allocation, Params; only the final
launch differs), so running each op on `sim` with every such read made to raise proves its
host path makes none. The GPU side (capture, replay, sync-debug mode "error"):
tests/gpu/test_cuda_graphs_gpu.py.

Exceptions by design, tested here as such: flash_attn_varlen reads cu_seqlens to refuse a
bad prefix sum (out-of-bounds reads), once per offsets tensor while it is unchanged, and not
while a CUDA graph is captured (ops/attention.py); grouped_gemm_contiguous(debug=True) reads
m_indices."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import attention as attn_launcher
from fastmoe_ops.reference import fp8 as ref

from attention_util import make_inputs
from host_sync_util import HostRead, guarded, no_host_reads
from fp8_gemm_util import contiguous_layout, expert_weights, quantised_operands

pytestmark = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")

def test_the_guard_catches_each_read():
    t = torch.ones(2)
    for read in (lambda: t.item(), lambda: t.tolist(), lambda: bool(t[0]), lambda: int(t[0]), lambda: float(t[0]),
                 lambda: t.numpy(), lambda: t.cpu()):
        with no_host_reads(), pytest.raises(HostRead):
            read()
    assert t.tolist() == [1.0, 1.0]  # restored


def test_fp8_ops_make_no_host_read():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(20, 256, generator=g).to(torch.bfloat16)
    xq, xs, wq, ws = quantised_operands(32, 64, 256, 21)
    wq3, ws3 = expert_weights(2, 64, 128, 21)
    cxq, cxs, m_indices = contiguous_layout([3, 9], 128, 21)
    x3 = [ref.quantize_per_token_group(torch.randn(8, 128, generator=g)) for _ in range(2)]
    xq3, xs3 = torch.stack([a for a, _ in x3]), torch.stack([s for _, s in x3])
    masked_m = torch.tensor([8, 3], dtype=torch.int32)
    with fmo.use_backend("sim"):
        guarded(fmo.fp8.quantize_per_token_group, x, 128)
        guarded(fmo.fp8.quantize_per_block, x, 128)
        guarded(fmo.fp8.quantize_per_token_group_transposed, x, 128)
        guarded(fmo.fp8.gemm, xq, xs, wq, ws)
        guarded(fmo.fp8.grouped_gemm_contiguous, cxq, cxs, wq3, ws3, m_indices)
        guarded(fmo.fp8.grouped_gemm_masked, xq3, xs3, wq3, ws3, masked_m, out=torch.zeros(2, 8, 64, dtype=torch.bfloat16))
        with pytest.raises(HostRead):  # debug=True checks m_indices on the host, by design
            guarded(fmo.fp8.grouped_gemm_contiguous, cxq, cxs, wq3, ws3, m_indices, debug=True)


def test_fp8_linear_forward_and_backward_make_no_host_read():
    torch.manual_seed(22)
    layer = fmo.nn.FP8Linear(128, 64)
    x = torch.randn(6, 128).requires_grad_()

    def step():
        layer(x).sum().backward()

    with fmo.use_backend("sim"):
        guarded(step)


def test_attention_makes_no_host_read_and_varlen_only_outside_capture(monkeypatch):
    q, k, v, dout = make_inputs(1, 6, 9, 2, 1, 64, torch.bfloat16, 23)
    q.requires_grad_()
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    with fmo.use_backend("sim"):
        guarded(lambda: fmo.flash_attn(q, k, v, causal=True).backward(dout))
        def varlen(cq, ck):
            return fmo.flash_attn_varlen(q[0].detach(), k[0], v[0], cq, ck, 4, 5, causal=True)

        with no_host_reads(), pytest.raises(HostRead, match="tolist"):  # new offsets: read on the host
            varlen(cu_q, cu_k)
        guarded(varlen, cu_q, cu_k)   # the same tensors again, unchanged: no second read
        cu_k.add_(0)                  # an in-place write (version bump): read again
        with no_host_reads(), pytest.raises(HostRead, match="tolist"):
            varlen(cu_q, cu_k)
        monkeypatch.setattr(attn_launcher, "capturing", lambda t: True)  # as under torch.cuda.graph
        with no_host_reads():
            varlen(cu_q.clone(), cu_k.clone())


def test_static_shape_moe_layer_makes_no_host_read():
    """Single rank, num_worst_tokens: routing, the masked experts and the weighted sum read no
    count on the host. Across ranks the dispatch still agrees counts in a host handshake, even
    on ipc with num_worst_tokens (tests/mpi/test_moe_ipc.py's strict xfail records it)."""
    torch.manual_seed(24)
    layer = fmo.nn.MoELayer(128, 128, 4, 2, num_worst_tokens=16, dtype=torch.float32)
    x = torch.randn(12, 128).requires_grad_()

    def step():
        layer(x).square().sum().backward()

    with fmo.use_backend("sim"):
        guarded(step)
