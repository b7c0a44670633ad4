"""The attention reference (the oracle) against an independent per-row loop in float64:
bottom-right causal masks, GQA, rows that see no key (out 0, lse -inf, finite gradients),
varlen as a concatenation of dense calls."""
from __future__ import annotations

import math

import pytest
import torch

from fastmoe_ops.reference import attention as ref


def naive(q, k, v, causal, scale):
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, hq, sq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                js = [j for j in range(sk) if not causal or j <= i + sk - sq]
                if not js:
                    continue
                s = torch.stack([q[bi, i, h].double() @ k[bi, j, h // (hq // hkv)].double() * scale for j in js])
                p = torch.softmax(s, 0)
                out[bi, i, h] = sum(p[n] * v[bi, j, h // (hq // hkv)].double() for n, j in enumerate(js))
                lse[bi, h, i] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("sq, sk, causal, hq, hkv", [(5, 7, False, 4, 2), (7, 5, True, 2, 1), (6, 6, True, 3, 3), (3, 0, False, 2, 1)])
def test_reference_matches_loop(sq, sk, causal, hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, sq, hq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, sk, hkv, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, sk, hkv, 8, generator=g, dtype=torch.float64)
    out, lse = ref.attention(q, k, v, causal=causal, softmax_scale=0.3, compute_dtype=torch.float64)
    want_out, want_lse = naive(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)


def test_empty_rows_have_zero_output_and_finite_gradients():
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    out, lse = ref.attention(q, k, v, causal=True, compute_dtype=torch.float64)  # rows 0..2 see no key
    assert torch.all(out[:, :3] == 0) and torch.all(lse[:, :, :3] == -math.inf) and torch.isfinite(lse[:, :, 3:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_varlen_is_concatenated_dense():
    g = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6], dtype=torch.int32)
    q = torch.randn(8, 2, 8, generator=g)
    k = torch.randn(6, 1, 8, generator=g)
    v = torch.randn(6, 1, 8, generator=g)
    out, lse = ref.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    o0, l0 = ref.attention(q[None, :3], k[None, :4], v[None, :4], causal=True)
    torch.testing.assert_close(out[:3], o0[0])
    torch.testing.assert_close(lse[:, :3], l0[0])
    assert torch.all(out[3:] == 0) and torch.all(lse[:, 3:] == -math.inf)  # third sequence has no keys
