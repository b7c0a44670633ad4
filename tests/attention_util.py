"""Helpers shared by the fused-attention tests on the simulator (tests/) and on the GPU
(tests/gpu/): seeded inputs, the float64 oracle beside PyTorch's same-dtype computation, and
the checks (a helper module, so test files never import each other). Every helper works on
the inputs' device.

Rule (FlashAttention's): for out, dq, dk and dv, the kernel's max error against the float64
oracle is at most twice the error of the same computation done by PyTorch in the inputs'
dtype (bf16/fp16 matmuls and softmax), plus a small absolute term for rounding of the
output itself (a quarter of an ulp of the oracle's largest magnitude in that dtype, plus
0.05 ulp: where the exact gradient is 0, e.g. a row with one key, the kernel's delta from
the rounded output leaves a few fp32 ulps that PyTorch's same-dtype autograd does not). lse
(fp32 from fp32 accumulators) must be within 1e-3 of float64, and -inf exactly where the
row sees no key. NaN never."""
from __future__ import annotations

import math

import torch

from fastmoe_ops.reference import attention as ref

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make_inputs(b, sq, sk, hq, hkv, d, dtype, seed, *, varlen_cu=None, dv=None):
    """(q, k, v, dout) on the CPU, seeded; varlen_cu: packed [total, H, D] instead of [B, S, H, D]."""
    g = torch.Generator().manual_seed(seed)
    lead_q = (b, sq) if varlen_cu is None else (sq,)
    lead_k = (b, sk) if varlen_cu is None else (sk,)
    q = torch.randn(*lead_q, hq, d, generator=g).to(dtype)
    k = torch.randn(*lead_k, hkv, d, generator=g).to(dtype)
    v = torch.randn(*lead_k, hkv, dv or d, generator=g).to(dtype)
    dout = torch.randn(*lead_q, hq, dv or d, generator=g).to(dtype)
    return q, k, v, dout


def assert_within_rule(what, got, oracle, pt, dtype, ctx):
    assert not bool(torch.isnan(got).any()), f"{what}: NaN at {tuple(torch.isnan(got).nonzero()[0].tolist())} ({ctx})"
    err = (got.double() - oracle).abs()
    pt_err = (pt.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    bound = 2 * pt_err + EPS[dtype] * (scale / 4 + 0.05)
    if err.numel() and err.max().item() > bound:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{what}: max error {err.max().item():.3g} > {bound:.3g} (2 x PyTorch {dtype} error "
                             f"{pt_err:.3g} + rounding) at {idx}: got {got[idx].item()}, want {oracle[idx].item()} ({ctx})")


def assert_lse(lse, oracle, ctx):
    empty = oracle == -math.inf
    assert torch.equal(lse == -math.inf, empty), f"lse: -inf pattern differs ({ctx})"
    assert not bool(torch.isnan(lse).any()), f"lse: NaN ({ctx})"
    if bool((~empty).any()):
        err = (lse.double() - oracle)[~empty].abs().max().item()
        assert err < 1e-3, f"lse: max error {err:.3g} ({ctx})"


def oracle_and_pytorch(q, k, v, dout, causal, varlen=None):
    """(float64 out, lse, dq, dk, dv) and PyTorch's same-dtype (out, dq, dk, dv)."""
    def run(dtype):
        qs, ks, vs = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        if varlen is None:
            out, lse = ref.attention(qs, ks, vs, causal=causal, compute_dtype=dtype)
        else:
            out, lse = ref.attention_varlen(qs, ks, vs, *varlen, causal=causal, softmax_scale=q.shape[-1] ** -0.5,
                                            compute_dtype=dtype)
        grads = torch.autograd.grad(out, (qs, ks, vs), dout.to(dtype))
        return (out.detach(), lse, *grads)
    return run(torch.float64), run(q.dtype)


def uniform_inputs(b, sq, sk, hq, hkv, d):
    """q = 0: every visible key gets the same weight, so out[i, h] is the mean of v over the keys
    row i sees; v[j, hk, :] = j + 64 hk (exact in bf16) makes a wrong row, head (GQA mapping),
    column, mask or tile boundary show as a wrong integer-ish value, not as noise."""
    q = torch.zeros(b, sq, hq, d, dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d).to(torch.bfloat16)
    v = (torch.arange(sk)[:, None, None] + 64 * torch.arange(hkv)[None, :, None]).expand(sk, hkv, d)
    return q, k, v[None].expand(b, sk, hkv, d).to(torch.bfloat16).contiguous()


def assert_uniform_mean(out, lse, sq, sk, hq, hkv, causal):
    """out [B, Sq, Hq, D], lse [B, Hq, Sq] of uniform_inputs: the mean of the visible keys' v
    (within bf16's rounding), lse = log(keys seen) within 1e-5."""
    n = torch.tensor([min(sk, i + sk - sq + 1) if causal else sk for i in range(sq)], dtype=torch.float64)
    want = (n - 1)[None, :, None, None] / 2 + 64 * (torch.arange(hq) // (hq // hkv)).double()[None, None, :, None]
    err = (out.double() - want).abs()
    bad = err > 2.0**-8 * want.abs() + 1e-6
    assert not bool(bad.any()), f"out: {int(bad.sum())} wrong, first at {tuple(bad.nonzero()[0].tolist())}"
    lerr = (lse.double() - n.log()[None, None, :]).abs()
    assert bool((lerr < 1e-5).all()), f"lse: worst error {lerr.max().item():.3g}"
