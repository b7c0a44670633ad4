"""Helpers of the fused SwiGLU + FP8 quantisation tests on the CPU engines
(tests/test_fp8_swiglu_quant.py, which explains the bound) and on CUDA
(tests/gpu/test_fp8_swiglu_quant_gpu.py): the float64 oracle, the one-e4m3-ulp bracket derived
from the kernel's fp32 error bound, and the input makers (random; exact fp32 products)."""
from __future__ import annotations

import numpy as np
import torch

from fastmoe_ops.reference import fp8 as ref

from fp8_contract import e4m3_model

DELTA = 8 * 2.0**-24   # |a32 - a64| <= DELTA |a64|: csrc/quant/swiglu_quant.cuh's bound


def oracle(h: torch.Tensor, group: int = 128, pow2: bool = False):
    """(a64 [T, I] float64, the contract's quantisation of a64: aq, as)."""
    a64 = ref.silu_mul(h.double())
    return a64, *ref.quantize_per_token_group(a64.float(), group, pow2_scale=pow2)


def check_within_bound(h, aq, as_, group, pow2, where, eps=1e-12):
    """The bracket of the module docstring; returns the fraction of codes equal to the oracle's."""
    a64, rq, rs = oracle(h, group, pow2)
    a = a64.numpy()
    t, inter = a.shape
    assert not torch.isnan(as_).any(), f"NaN scale ({where})"
    amax = np.abs(a).reshape(t, -1, group).max(axis=2)
    lo_s = ref.group_scales(torch.from_numpy(amax * (1 - DELTA)), eps=eps, pow2_scale=pow2).numpy()
    hi_s = ref.group_scales(torch.from_numpy(amax * (1 + DELTA)), eps=eps, pow2_scale=pow2).numpy()
    s = as_.numpy()
    bad = (s < lo_s) | (s > hi_s)
    assert not bad.any(), (f"scale {s[bad][0]!r} at {tuple(np.argwhere(bad)[0])} outside [{lo_s[bad][0]!r}, "
                           f"{hi_s[bad][0]!r}] ({where})")
    # Quotient bracket with the engine's own scale: RN32 and e4m3 rounding are monotone.
    sk = np.repeat(s.astype(np.float64), group, axis=1)
    q_lo = e4m3_model((a * (1 - DELTA * np.sign(a)) / sk).astype(np.float32).astype(np.float64))
    q_hi = e4m3_model((a * (1 + DELTA * np.sign(a)) / sk).astype(np.float32).astype(np.float64))
    got = aq.double().numpy()
    bad = np.isnan(got) | (got < q_lo) | (got > q_hi)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(f"code {got[i, j]} at {(int(i), int(j))} outside [{q_lo[i, j]}, {q_hi[i, j]}] "
                             f"(a64 {a[i, j]!r}, scale {s[i, j // group]!r}; {where})")
    # The bracket is at most one e4m3 step wide: the tolerance is one ulp, not more.
    codes = lambda v: torch.from_numpy(v.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).int() & 0x7F
    assert int((codes(q_hi) - codes(q_lo)).abs().max()) <= 1, f"bracket wider than one e4m3 ulp ({where})"
    return float((aq.view(torch.uint8) == rq.view(torch.uint8)).double().mean())


def random_h(t, inter, dtype, seed, stride_pad=0, offset=0):
    """Gates ~ 3 N(0,1), ups ~ N(0,1) times per-row magnitudes over six decades; optionally a
    view with padded rows (stride 2I + stride_pad) starting `offset` elements in."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(t, 2 * inter + stride_pad + offset, generator=g)
    base[:, offset:offset + inter] *= 3
    base[:, offset + inter:] *= torch.logspace(-3, 3, t)[:, None]
    return base.to(dtype)[:, offset:offset + 2 * inter]


def exact_h(t, inter, dtype, seed):
    """Inputs whose fp32 product is exact (see the module docstring), NaN and +-inf included."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 4, (t, inter), generator=g)
    big = (torch.rand(t, inter, generator=g) * 200 + 32).to(torch.bfloat16).float()
    gate = torch.where(pick == 0, 0.0, torch.where(pick == 1, big, torch.where(pick == 2, -big - 128, -big * 4)))
    up = torch.randn(t, inter, generator=g).to(torch.bfloat16).float() * 4
    if t > 2:
        gate[0, 3], gate[1, 5], gate[2, 7] = float("inf"), float("-inf"), float("nan")
        up[0, 3] = -1.5                                             # inf * -1.5: -inf, saturates
        up[0, 9], up[1, 130 % inter] = float("inf"), float("nan")
        gate[0, 9] = 40.0    # not a gate <= -128: its silu is -0 in fp32, nonzero in float64, and -0 * inf is NaN
    if t > 3:
        gate[3, :128] = 0.0                                         # an all-zero group: the eps floor
    return torch.cat([gate, up], 1).to(dtype)
