"""CUDA graphs: every op with static shapes is captured by torch.cuda.graph and replayed on
new inputs, under torch.cuda.set_sync_debug_mode("error") (any host synchronisation in the
op's host path raises; during capture it would also invalidate the graph). The replayed
outputs, poisoned before each replay, must equal bit for bit an eager call on the new
inputs (the kernels are deterministic: fixed reduction orders, no atomics).

The CPU side of the same property (no host read in the launcher code):
tests/test_host_syncs.py. Skipped without a CUDA device and CuPy."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from fp8_gemm_util import contiguous_layout, expert_weights, quantised_operands
from gpu_util import DEV, capture_replay_check, needs_cuda

pytestmark = needs_cuda


def bf16(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16).to(DEV)


@pytest.mark.parametrize("name", ["quantize_per_token_group", "quantize_per_block", "quantize_per_token_group_transposed"])
def test_quantisers_capture_and_replay(name):
    fn = getattr(fmo.fp8, name)
    capture_replay_check(name, lambda x: fn(x, 128), [bf16((96, 512), 1)], [bf16((96, 512), 2, 30.0)], 1)


def test_gemm_capture_and_replay():
    a = [t.to(DEV) for t in quantised_operands(200, 256, 512, 3)]
    b = [t.to(DEV) for t in quantised_operands(200, 256, 512, 4)]
    capture_replay_check("fp8.gemm", lambda *t: fmo.fp8.gemm(*t), a, b, 3)
    out = torch.empty(200, 256, dtype=torch.float32, device=DEV)
    capture_replay_check("fp8.gemm out=", lambda *t: fmo.fp8.gemm(*t, torch.float32, out=out), a, b, 3)


def test_grouped_gemms_capture_and_replay():
    wq3, ws3 = (t.to(DEV) for t in expert_weights(4, 256, 512, 5))
    xq, xs, m_indices = (t.to(DEV) for t in contiguous_layout([5, 0, 130, 64], 512, 5))
    xq2, xs2, _ = (t.to(DEV) for t in contiguous_layout([5, 0, 130, 64], 512, 6))
    capture_replay_check("grouped_gemm_contiguous", lambda *t: fmo.fp8.grouped_gemm_contiguous(*t),
                         [xq, xs, wq3, ws3, m_indices], [xq2, xs2, wq3, ws3, m_indices], 5)

    def masked_inputs(seed, counts):
        g = torch.Generator().manual_seed(seed)
        q = [ref.quantize_per_token_group(torch.randn(64, 512, generator=g)) for _ in range(4)]
        return [torch.stack([a for a, _ in q]).to(DEV), torch.stack([s for _, s in q]).to(DEV), wq3, ws3,
                torch.tensor(counts, dtype=torch.int32, device=DEV)]

    # masked_m is data: the replay sees the new counts without a host read or a new capture
    capture_replay_check("grouped_gemm_masked (rows < masked_m)",
                         lambda *t: fmo.fp8.grouped_gemm_masked(*t, out=torch.zeros(4, 64, 256, dtype=torch.bfloat16, device=DEV)),
                         masked_inputs(7, [64, 0, 17, 40]), masked_inputs(8, [3, 64, 0, 9]), 7)


def test_fp8_linear_forward_captures_and_replays():
    torch.manual_seed(9)
    layer = fmo.nn.FP8Linear(512, 256, device=DEV)
    capture_replay_check("FP8Linear forward", lambda x: layer(x), [bf16((64, 512), 9)], [bf16((64, 512), 10)], 9)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_forward_and_backward_capture_and_replay(causal):
    def qkv(seed):
        return [bf16((2, 100, 4, 128), seed), bf16((2, 130, 2, 128), seed + 1), bf16((2, 130, 2, 128), seed + 2)]

    capture_replay_check("flash_attn fwd (out, lse)", lambda q, k, v: fmo.flash_attn(q, k, v, causal=causal, return_lse=True),
                         qkv(11), qkv(21), 11)
    q, k, v = qkv(31)
    out, lse = fmo.flash_attn(q, k, v, causal=causal, return_lse=True)
    q2, k2, v2 = qkv(41)
    out2, lse2 = fmo.flash_attn(q2, k2, v2, causal=causal, return_lse=True)
    scale = 128 ** -0.5
    capture_replay_check("flash_attn bwd (dq, dk, dv)",
                         lambda *t: torch.ops.fmo.flash_attn_bwd(*t, causal, scale),
                         [bf16((2, 100, 4, 128), 51), q, k, v, out, lse], [bf16((2, 100, 4, 128), 52), q2, k2, v2, out2, lse2], 31)


def test_attention_varlen_captures_without_reading_the_offsets():
    cu_q = torch.tensor([0, 30, 30, 100], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 50, 90, 130], dtype=torch.int32, device=DEV)

    def fn(q, k, v):
        return fmo.flash_attn_varlen(q, k, v, cu_q, cu_k, 70, 50, causal=True)

    capture_replay_check("flash_attn_varlen fwd", fn, [bf16((100, 4, 128), 61), bf16((130, 2, 128), 62), bf16((130, 2, 128), 63)],
                         [bf16((100, 4, 128), 64), bf16((130, 2, 128), 65), bf16((130, 2, 128), 66)], 61,
                         eager_reads_host=True)


def test_static_shape_moe_layer_forward_captures_and_replays():
    """Single rank, num_worst_tokens: routing, masked experts and the weighted sum in one graph
    (the multi-rank ipc transport with num_worst_tokens: tests/gpu/test_moe_gpu.py's domain,
    test_ipc_static_path_captured_in_a_cuda_graph)."""
    torch.manual_seed(25)
    layer = fmo.nn.MoELayer(256, 256, 8, 2, num_worst_tokens=64, dtype=torch.bfloat16, device=DEV)
    capture_replay_check("MoELayer(num_worst_tokens) forward", lambda x: layer(x), [bf16((48, 256), 26)],
                         [bf16((48, 256), 27)], 25)
