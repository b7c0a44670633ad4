"""Inputs, quantisation, the simulator launch and the arithmetic-derived tolerance of the FP8
attention forward's tests (tests/test_attention_fp8.py, tests/gpu/test_attention_fp8_gpu.py)."""
from __future__ import annotations

import math

import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import attention_hopper_fp8 as fp8_kernel
from fastmoe_ops.reference.attention import expand_kv_descale

E4M3 = torch.float8_e4m3fn


def quantise(x: torch.Tensor):
    """Per-(batch, head) e4m3 codes of x [B, S, H, D] with scale amax / 448: (codes, descale [B, H])."""
    amax = x.abs().amax(dim=(1, 3)).clamp_min(1e-30)
    descale = (amax / 448.0).float()
    codes = (x / descale.double()[:, None, :, None]).to(E4M3)
    return codes, descale


def quantise_blocks(x: torch.Tensor, block: int = 128):
    """Per-(batch, head, block of `block` keys) e4m3 codes of x [B, S, H, D]: (codes, descale [B, H, nb])."""
    b, sk, h, d = x.shape
    nb = -(-sk // block)
    pad = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * block - sk))
    amax = pad.abs().reshape(b, nb, block, h, d).amax(dim=(2, 4)).transpose(1, 2).clamp_min(1e-30)  # [B, H, nb]
    descale = (amax / 448.0).float()
    codes = (x / expand_kv_descale(descale, sk)).to(E4M3)
    return codes, descale


def inputs(seed: int, *, outliers: bool = False, b=2, sq=64, sk=96, hq=4, hkv=2, d=128, dv=128):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, dv, generator=g, dtype=torch.float64)
    if outliers:  # a few channels 30x larger (the activation outliers of LLMs), different per head
        for t in (q, k, v):
            ch = torch.randint(0, t.shape[-1], (4,), generator=g)
            t[..., ch] *= 30.0
        q *= 0.2
    # per-head magnitudes differ, so a scale applied to the wrong (batch, head) shows
    q *= torch.linspace(0.5, 2.0, hq, dtype=torch.float64)[None, None, :, None]
    v *= torch.linspace(1.0, 4.0, b, dtype=torch.float64)[:, None, None, None]
    return q, k, v


QGMMA_STEP = 34 * 2.0 ** -13  # one k32 step (kQgmmaRule): each of the 33 terms (32 products, the accumulator)
#                               truncated 13 bits below the largest term M, the result to 13 fraction bits:
#                               at most 34 units of 2^(e(M) - 13) <= 34 2^-13 M
P_ROUNDING = 2.0 ** -4     # P * 256 rounded to e4m3 (3 mantissa bits, round to nearest): relative 2^-4


def run_kernel(q8, k8, v8, dq, dk, dv, *, causal, broken_permutation=False, compute_sms=None):
    """The kernel on the simulator with NaN-poisoned outputs (an element it never writes fails)."""
    b, sq, hq, d = q8.shape
    out = torch.full((b, sq, hq, d), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((b, hq, sq), float("nan"))
    with fmo.use_backend("sim"):
        return fp8_kernel.forward(q8, k8, v8, dq, dk, dv, causal=causal, softmax_scale=None, engine="sim",
                                  broken_permutation=broken_permutation, out=out, lse=lse, compute_sms=compute_sms)


def kernel_tolerance(q8, k8, v8, dq, dk, dv, want, softmax_scale=None):
    """|out - oracle| per element, from the kernel's arithmetic (the oracle is float64 on the same
    dequantised codes): S = Q K^T by D / 32 QGMMA steps, step s off by QGMMA_STEP of its largest term
    M_s = max(|partial sum before s|, max over its 32 d of |q~ k~|) (so softmax weights move by a
    factor within exp(+-2 delta)); P rounded to e4m3 (P_ROUNDING of each weight, plus e4m3's
    subnormal spacing 2^-9 / 256 absolute of P dv_j / dv_max, per key: Sk 2^-18 dv_max max |v8|);
    O += P V by ceil(Sk / 32) QGMMA steps, each off by QGMMA_STEP of max |v~| (accumulator and terms
    are at most 256 l max |v~|); bf16 output rounding 2^-8 relative. A worst-case bound: where scores
    are large (outliers, K block ramps) the S term makes it loose, so mutations are checked on cases
    where it stays tight (the broken permutation here; a block-scale index pinned to 0 fails the D 64
    block-scale case). Returns (out tolerance [B, Sq, Hq, D], lse tolerance [B, Hq, Sq])."""
    b, sq, hq, d = q8.shape
    sk, hkv = k8.shape[1], k8.shape[2]
    g = hq // hkv
    qt = q8.double() * dq.double()[:, None, :, None]
    kt = (k8.double() * expand_kv_descale(dk, sk)).repeat_interleave(g, 2)
    vt = (v8.double() * expand_kv_descale(dv, sk)).abs()
    v_codes = v8.double().abs().amax(dim=(1, 3)) * dv.double().reshape(b, hkv, -1).amax(-1)  # dv_max max|v8| [B, Hkv]
    prod = torch.einsum("bihd,bjhd->bhijd", qt, kt).reshape(b, hq, sq, sk, d // 32, 32)  # every product
    step_sum = prod.sum(-1)
    before = step_sum.cumsum(-1) - step_sum                                              # the accumulator
    m = torch.maximum(prod.abs().amax(-1), torch.maximum(before.abs(), (before + step_sum).abs()))
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    delta = (QGMMA_STEP * scale * m.sum(-1)).amax(-1)                               # [B, Hq, Sq]
    vmax = vt.amax(dim=(1, 3)).repeat_interleave(g, dim=1)[:, :, None]                  # [B, Hq, 1]
    vcodes = v_codes.repeat_interleave(g, dim=1)[:, :, None]
    per_row = (torch.expm1(2 * delta) + P_ROUNDING + math.ceil(sk / 32) * QGMMA_STEP) * vmax + sk * 2.0 ** -18 * vcodes
    tol = per_row.permute(0, 2, 1)[..., None] + want.abs() * 2.0 ** -8 + 1e-6    # [B, Sq, Hq, 1] + [..., D]
    return tol, delta + 1e-5  # lse: log-sum-exp moves by at most the largest score error (+ fp32 log / exp2)


def check_kernel(out, lse, want, wlse, tols, what):
    tol, lse_tol = tols
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    err = (out.double() - want).abs()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{what}: NaN (an unwritten element?)"
    bad = err > tol
    if bad.any():
        i = tuple(int(x) for x in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements over tolerance; first {i}: got {out[i].item()}, "
                             f"want {want[i].item()}, tol {tol[i].item():.3g}; max err/tol {(err / tol).max():.3f}")
    finite = torch.isfinite(wlse)
    assert torch.equal(torch.isfinite(lse), finite), f"{what}: lse -inf pattern differs"
    lerr = (lse.double() - wlse.double()).abs()
    assert (lerr[finite] <= lse_tol[finite]).all(), f"{what}: lse error / tolerance {(lerr / lse_tol)[finite].max()}"
    return (err / tol).max().item()
