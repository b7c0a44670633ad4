"""The tensor cores' arithmetic on Hopper, as a plain numpy model, and the error bound of an
FP8 GEMM that follows from it.

The simulator implements the same rule in C++ (ptx/tensor_core_numerics.cuh, which states it
and where it comes from); this is an independent implementation for the tests' models, and the
place tolerances are derived from. One dot-add step computes d = c + sum_k a_k b_k by aligning
every term to the largest exponent, truncating each to `window_bits` bits below it, adding
exactly, and truncating the normalised sum to `out_fraction_bits` fraction bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DotAddRule:
    window_bits: int
    out_fraction_bits: int


QGMMA = DotAddRule(13, 13)  # wgmma .e4m3/.e5m2 -> f32 (Hopper)
HMMA = DotAddRule(25, 23)   # mma.sync / HMMA .bf16/.f16 -> f32 (Hopper)

# Smallest exponent of each input format: a subnormal keeps it, with a significand below 1.
MIN_EXPONENT = {"e4m3": -6, "e5m2": -14, "f16": -14, "bf16": -126, "f32": -126}
E4M3_MIN_NORMAL = 2.0**-6


def _exponent(v: np.ndarray, fmt: str) -> np.ndarray:
    """floor(log2 |v|) clamped at the format's minimum; a huge negative for zeros (never the max)."""
    _, e = np.frexp(v)
    return np.where(v == 0, np.iinfo(np.int64).min // 4, np.maximum(e.astype(np.int64) - 1, MIN_EXPONENT[fmt]))


def _truncate(x: np.ndarray, quantum_exp: np.ndarray) -> np.ndarray:
    """x truncated toward zero to a multiple of 2^quantum_exp (exact in float64 here)."""
    q = np.ldexp(1.0, np.clip(quantum_exp, -1074, 1000))  # zeros: any nonzero q
    return np.trunc(x / q) * q


def dot_add(a: np.ndarray, b: np.ndarray, c: np.ndarray, fmt: str, rule: DotAddRule) -> np.ndarray:
    """One step over the last axis: c [...] fp32 + sum_k a[..., k] * b[..., k], a and b exact
    values of `fmt` (float64). Returns float32 [...]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = np.asarray(c, np.float32).astype(np.float64)
    products = a * b  # exact: at most 2 x 11 significant bits
    align = np.where((a == 0) | (b == 0), np.iinfo(np.int64).min // 4, _exponent(a, fmt) + _exponent(b, fmt))
    align = np.concatenate([_exponent(c, "f32")[..., None], align], axis=-1)
    terms = np.concatenate([c[..., None], products], axis=-1)
    emax = align.max(axis=-1)
    total = _truncate(terms, emax[..., None] - rule.window_bits).sum(axis=-1)
    lead = np.maximum(_exponent(total, "f32"), -126)
    out = _truncate(total, lead - rule.out_fraction_bits)
    out = np.where(np.abs(out) >= 2.0**128, np.copysign(np.inf, out), out)
    out = np.where(out == 0, 0.0, out)  # an exact zero is +0
    with np.errstate(invalid="ignore"):
        ieee = c + products.sum(axis=-1)  # NaN / inf operands: IEEE on the exact terms decides
    special = ~np.isfinite(c) | ~np.isfinite(products).all(axis=-1) | np.isnan(products).any(axis=-1)
    return np.where(special, ieee, out).astype(np.float32)


def wgmma_fp8(a: np.ndarray, b: np.ndarray, c: np.ndarray | None) -> np.ndarray:
    """D [M, N] of a chain of wgmma .e4m3 m64nNk32 instructions over K (a multiple of 32):
    a [M, K], b [N, K] exact values, c [M, N] fp32 or None (scale-d = 0 on the first)."""
    m, k = a.shape
    n = b.shape[0]
    acc = np.zeros((m, n), np.float32) if c is None else np.asarray(c, np.float32)
    for k0 in range(0, k, 32):
        acc = dot_add(a[:, None, k0:k0 + 32], b[None, :, k0:k0 + 32], acc, "e4m3", QGMMA)
    return acc


def mma_sync(a: np.ndarray, b: np.ndarray, c: np.ndarray, fmt: str) -> np.ndarray:
    """D [M, N] of a chain of mma.sync m16n8k16 (bf16, f16) or m16n8k32 (e4m3, e5m2) over K on
    sm_90: a [M, K], b [K, N] exact values, c [M, N] fp32. fp8 is what ptxas emits for sm_90:
    exact f16 operands, one HMMA over k % 4 in {0, 1} from 0, one over k % 4 in {2, 3}, then
    + c in fp32 (round to nearest even)."""
    acc = np.asarray(c, np.float32)
    step = 32 if fmt in ("e4m3", "e5m2") else 16
    for k0 in range(0, a.shape[1], step):
        ak, bk = a[:, None, k0:k0 + step], b[k0:k0 + step, :].T[None, :, :]
        if step == 16:
            acc = dot_add(ak, bk, acc, fmt, HMMA)
            continue
        lo = np.array([k for k in range(32) if k % 4 < 2])
        part = dot_add(ak[..., lo], bk[..., lo], np.zeros(acc.shape, np.float32), "f16", HMMA)
        part = dot_add(ak[..., lo + 2], bk[..., lo + 2], part, "f16", HMMA)
        acc = (acc + part).astype(np.float32)
    return acc


# ----------------------------------------------------------------------- FP8 GEMM bound

WINDOW_OF_KERNEL = {
    "wgmma": QGMMA.window_bits,
    # fp8 mma.sync on sm_90: two 25-bit HMMA steps of 16 terms and an fp32 FADD per k32
    # instruction; 23 bits bounds all three roundings with the same count of terms below.
    "mma_sync": 23,
}
K_STEP = 32  # K of one MMA instruction (wgmma m64nNk32, mma.sync m16n8k32)


def fp8_gemm_error_bound(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, *,
                         kernel: str, b_scale_rows: int = 128, block_k: int = 128) -> torch.Tensor:
    """float64 [M, N]: how far a GEMM kernel's fp32 result may be from the float64 oracle of
    the same quantised operands, from the hardware's rule (not an fp32 assumption).

    Inside a 128-wide K block the kernel chains 32-wide MMA steps from zero. In step s each of
    the 33 terms (the accumulator and 32 products) is truncated by less than one quantum
    2^(emax - window), and the result by less than 2^-window of its magnitude. 2^emax is at
    most the larger of the accumulator's magnitude (|exact partial sum so far| + the error so
    far) and the largest product's 2^(ea + eb) <= max_k |a'_k| * max_k |b'_k| over the step
    (a' = max(|a|, 2^-6): an e4m3 subnormal's exponent is -6). So, with P_s the exact partial
    sum after step s and E_s the error bound,
        E_s = E_{s-1} + 33 q_s + 2^-window (|P_s| + E_{s-1} + 33 q_s),
        q_s = 2^-window max(|P_{s-1}| + E_{s-1}, max|a'| max|b'|),
    and the block's E, times its two scales, adds up over K. The fp32 promotion adds
    (blocks + 2) roundings of at most 2^-24 of the scaled magnitudes."""
    eps = 2.0 ** -WINDOW_OF_KERNEL[kernel]
    xq, xs, wq, ws = (t.cpu() for t in (xq, xs, wq, ws))
    m, k = xq.shape
    n = wq.shape[0]
    a, b = xq.double(), wq.double()
    a_mag, b_mag = a.abs().clamp_min(E4M3_MIN_NORMAL), b.abs().clamp_min(E4M3_MIN_NORMAL)
    b_scale = ws.double().repeat_interleave(b_scale_rows, dim=0)[:n]  # [N, K blocks]
    bound = torch.zeros(m, n, dtype=torch.float64)
    magnitude = torch.zeros(m, n, dtype=torch.float64)  # sum over blocks of scaled |a||b|
    for kb, k0 in enumerate(range(0, k, block_k)):
        partial = torch.zeros(m, n, dtype=torch.float64)
        err = torch.zeros(m, n, dtype=torch.float64)
        for s0 in range(k0, min(k0 + block_k, k), K_STEP):
            s1 = min(s0 + K_STEP, k)
            largest_product = a_mag[:, s0:s1].amax(1)[:, None] * b_mag[:, s0:s1].amax(1)[None, :]
            quantum = eps * torch.maximum(partial.abs() + err, largest_product)
            partial = partial + a[:, s0:s1] @ b[:, s0:s1].t()
            err = err + 33 * quantum + eps * (partial.abs() + err + 33 * quantum)
        scale = xs.double()[:, kb:kb + 1] * b_scale[None, :, kb]
        bound += scale * err
        magnitude += scale * (a[:, k0:k0 + block_k].abs() @ b[:, k0:k0 + block_k].abs().t())
    blocks = -(-k // block_k)
    return bound + (blocks + 2) * 2.0**-24 * magnitude
