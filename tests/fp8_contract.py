"""The FP8 quantisation contract of csrc/quant/fp8_scale.cuh, derived again in numpy and
float64 without torch arithmetic or CUDA's headers, and the edge inputs that pin it down: a
helper module of tests/test_fp8_quant_contract.py (CPU) and
tests/gpu/test_fp8_quant_contract_gpu.py (CUDA); test files never import each other. It also
holds `e4m3_model`, the same e4m3 rounding by another route (log2 and numpy's round-half-even
on the grid, in float64), the model of tests/test_fp8_quant.py and tests/test_fp8_block_quant.py.

The derivation takes other routes than the kernels and the reference wherever it can:
  - fp32 quotients a / b come from float64 division rounded once to fp32: for two fp32
    operands this is the correctly rounded fp32 quotient (double rounding is innocuous when
    the wider format has at least 2p + 2 = 50 significand bits; float64 has 53);
  - powers of two come from frexp, not from the bits;
  - e4m3 rounding compares with the exact midpoints between consecutive codes (float64
    holds every code, every midpoint and every fp32 value exactly), ties to the even code.
"""
from __future__ import annotations

import math

import numpy as np
import torch

E4M3_MAX = 448.0
NAN_CODE = 0x7F


def e4m3_value(code: int) -> float:
    """The value of a non-negative e4m3 code 0x00..0x7e, from the bit layout S.EEEE.MMM."""
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0:
        return mantissa * 2.0**-9               # subnormals: steps of 2^-9
    return (1 + mantissa / 8) * 2.0 ** (exponent - 7)


VALUES = np.array([e4m3_value(c) for c in range(0x7F)])    # increasing, 0 .. 448
MIDPOINTS = (VALUES[:-1] + VALUES[1:]) / 2                  # exact in float64


def e4m3_codes(y: np.ndarray) -> np.ndarray:
    """fp32 y -> e4m3 codes: nearest code, ties to the even code (the code's last bit is
    the mantissa's), magnitudes above 448 (inf too) -> 448, sign kept (zeros too), NaN ->
    0x7f."""
    y = np.asarray(y, dtype=np.float32).astype(np.float64)
    nan = np.isnan(y)
    a = np.where(nan, 0.0, np.abs(y))
    lo = np.minimum(np.searchsorted(VALUES, a, side="right") - 1, 0x7E)  # largest code value <= a
    mid = np.where(lo < 0x7E, MIDPOINTS[np.minimum(lo, 0x7D)], np.inf)
    up = (a > mid) | ((a == mid) & (lo % 2 == 1))
    code = (lo + up).astype(np.uint8) | (np.signbit(y).astype(np.uint8) << 7)
    code[nan] = NAN_CODE
    return code


def e4m3_model(v: np.ndarray) -> np.ndarray:
    """float64 model of cvt.rn.satfinite.e4m3: round to nearest even on the e4m3 grid
    (3 mantissa bits, normals from 2^-6, subnormal spacing 2^-9), saturate to +-448."""
    out = np.empty_like(v)
    nan = np.isnan(v)
    a = np.minimum(np.abs(np.where(nan, 0.0, v)), E4M3_MAX)  # satfinite: anything above 448 (inf too) -> 448
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    quantum = np.where(a >= 2.0**-6, 2.0 ** (np.maximum(e, -6) - 3), 2.0**-9)
    q = np.round(a / quantum) * quantum  # np.round is round-half-even
    out[:] = np.sign(v) * q
    out[nan] = np.nan
    return out


def fp32_quotient(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RN32(a / b) for fp32 a, b (see the module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(a, np.float32).astype(np.float64) / np.asarray(b, np.float32).astype(np.float64)).astype(np.float32)


def contract_scales(amax: np.ndarray, eps: float, pow2: bool) -> np.ndarray:
    """RN32(max(amax, fp32(eps)) / 448), then (pow2) the smallest power of two >= it."""
    scale = fp32_quotient(np.maximum(amax.astype(np.float32), np.float32(eps)), np.float32(E4M3_MAX))
    if pow2:
        frac, exp = np.frexp(scale.astype(np.float64))  # scale = frac * 2^exp, frac in [0.5, 1)
        scale = np.ldexp(1.0, np.where(frac == 0.5, exp - 1, exp)).astype(np.float32)
    return scale


def contract_quantize_blocks(x: torch.Tensor, block_rows: int, block_cols: int, *, pow2: bool, eps: float = 1e-12):
    """x [R, C] (any float dtype, widened exactly) -> (codes uint8 [R, C], scales fp32
    [ceil(R/block_rows), ceil(C/block_cols)]), one scale per block (edge blocks partial)."""
    xf = x.detach().cpu().float().numpy()
    r, c = xf.shape
    br, bc = math.ceil(r / block_rows), math.ceil(c / block_cols)
    padded = np.zeros((br * block_rows, bc * block_cols), np.float32)
    padded[:r, :c] = xf
    a = np.abs(padded)
    amax = np.where(np.isfinite(a), a, 0).reshape(br, block_rows, bc, block_cols).max(axis=(1, 3))
    scales = contract_scales(amax, eps, pow2)
    per_element = np.repeat(np.repeat(scales, block_rows, 0), block_cols, 1)[:r, :c]
    return e4m3_codes(fp32_quotient(xf, per_element)), scales


def contract_quantize(op: str, x: torch.Tensor, size: int, *, pow2: bool, eps: float = 1e-12):
    """The contract of one public op: 'token_group' (1 x size), 'block' (size x size) or
    'transposed' (x^T per 1 x size along x's rows, columns padded with code 0 to a multiple
    of 16). -> (codes uint8, scales fp32) as numpy arrays."""
    if op == "token_group":
        return contract_quantize_blocks(x, 1, size, pow2=pow2, eps=eps)
    if op == "block":
        return contract_quantize_blocks(x, size, size, pow2=pow2, eps=eps)
    assert op == "transposed", op
    codes, scales = contract_quantize_blocks(x.t(), 1, size, pow2=pow2, eps=eps)
    m = x.shape[0]
    out = np.zeros((codes.shape[0], -(-m // 16) * 16), np.uint8)
    out[:, :m] = codes
    return out, scales


def codes_of(q: torch.Tensor) -> np.ndarray:
    """The raw e4m3 codes of a float8_e4m3fn tensor (any device)."""
    return q.detach().cpu().contiguous().view(torch.uint8).numpy()


def assert_matches_contract(got, want, what: str) -> None:
    """got: (q float8_e4m3fn, s fp32) tensors; want: (codes, scales) numpy. Bitwise, naming
    the first differing element."""
    for name, g, w in (("scales", got[1].detach().cpu().numpy().view(np.uint32), want[1].view(np.uint32)),
                       ("codes", codes_of(got[0]), want[0])):
        assert g.shape == w.shape, f"{what}: {name} shape {g.shape} != {w.shape}"
        bad = np.argwhere(g != w)
        if bad.size:
            i = tuple(int(v) for v in bad[0])
            raise AssertionError(f"{what}: {len(bad)} {name} differ from the contract; first at {i}: "
                                 f"got {g[i]:#x}, contract {w[i]:#x}")


def layout_of(x: torch.Tensor, layout: str) -> torch.Tensor:
    """contiguous (the 16-byte vector path), or the same values one element into a wider
    tensor (misaligned, row-strided: the scalar path)."""
    if layout == "contiguous":
        return x
    wide = torch.zeros(x.shape[0], x.shape[1] + 8, dtype=x.dtype, device=x.device)
    wide[:, 1:1 + x.shape[1]] = x
    return wide[:, 1:1 + x.shape[1]]


# ----------------------------------------------------------------------------- edge inputs

GROUP = 128
COLS = 3 * GROUP + 40  # a ragged last group of 40


def _signed(values: np.ndarray) -> np.ndarray:
    """Alternate signs, so ties and saturation are seen on both sides of zero."""
    return values * np.where(np.arange(values.size) % 2 == 0, 1.0, -1.0)


def _group(values) -> np.ndarray:
    """Exactly GROUP values (padded with zeros) for one 1 x 128 group."""
    v = np.zeros(GROUP)
    values = np.asarray(values, np.float64)[:GROUP]
    v[:values.size] = values
    return v


def _row(*groups) -> np.ndarray:
    """A row of COLS elements: up to four groups, the last cut to the ragged 40."""
    row = np.zeros(4 * GROUP)
    for i, g in enumerate(groups):
        row[i * GROUP:(i + 1) * GROUP] = g
    return row[:COLS]


def edge_inputs(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[40, 424] values of `dtype` (CPU) that stress every clause of the contract for 1 x 128
    groups; other group and block sizes still see the same values.

    rows 0-2: e4m3 midpoints (ties) scaled by an exact power-of-two scale (amax = 448 * 2^k
              makes scale = 2^k), normal and subnormal, both signs, k = 0, -3, 5;
    row 3:    every e4m3 code value, and values around 448 (ties 432 -> 448, 400 -> 384);
    row 4:    a non-power-of-two scale (amax 1) with x = RN32(midpoint * scale) and its fp32
              neighbours: x / scale rounds to a midpoint in fp32 without being one (fp32
              inputs only: bf16 and fp16 cannot hold them);
    row 5:    an all-zero group (with -0.0), a group of only NaN (both signs), +-inf and
              zeros (amax 0: the eps floor), NaN/inf/-0/huge among normal values, random;
    row 6:    input subnormals (fp32, fp16), values below eps (amax < eps), tiny negatives
              that round to -0;
    rows 7-39: random groups spanning 12 decades, so the scales have all kinds of mantissas.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for k in (0, -3, 5):
        mids = _signed(MIDPOINTS[::-1]) * 2.0**k               # 126 ties, largest first
        top = E4M3_MAX * 2.0**k                                # amax: scale = 2^k exactly
        rows.append(_row(_group([top, -0.0, *mids]), _group([-top, *(-mids[::-1])]),
                         _group([top, *_signed(VALUES) * 2.0**k]), _group([top, *mids[-39:]])))
    near_max = [448, 447.9, 447.5, 447, 440, -440, 432, -432, 424, 416, 400, -400, 463.9]  # ties: 432 -> 448, 400 -> 384
    rows.append(_row(_group(_signed(VALUES)), _group(near_max), _group(-np.array(near_max)),
                     _group(rng.uniform(-448, 448, 40))))
    scale = np.float32(1.0) / np.float32(E4M3_MAX)             # the fp32 scale of amax = 1
    ties = (MIDPOINTS * np.float64(scale)).astype(np.float32)  # x / scale: a midpoint after RN32
    up, down = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0))
    rows.append(_row(_group([1.0, *_signed(ties.astype(np.float64))]), _group([1.0, *up.astype(np.float64)]),
                     _group([-1.0, *(-down.astype(np.float64))]), _group(rng.standard_normal(40))))
    nan, inf = np.nan, np.inf
    rows.append(_row(_group([0.0, -0.0] * 20),
                     _group([nan, inf, -inf, 0.0, -0.0, nan] * 3),
                     _group([nan, 1.5, nan, -2.25, inf, 3.0, -inf, -0.0, 3e38, -1e-3, *rng.standard_normal(100)]),
                     _group(rng.standard_normal(40) * 1e3)))
    # x / scale for the last group (amax 1): -4.5e-5, -9e-4 (both -0), 9e-4 (+0), -1.3e-3, 1.5e-3 (+-2^-9)
    rows.append(_row(_group([2.0**-140, -2.0**-145, 2.0**-130, 2.0**-126 * 3]),
                     _group(np.concatenate([np.arange(1, 30) * 2.0**-24, -np.arange(1, 30) * 2.0**-24])),
                     _group(rng.standard_normal(128) * 3e-13),
                     _group([1.0, -1e-7, -2e-6, 2e-6, -3e-6, 3.3e-6])))
    for _ in range(33):
        decades = rng.uniform(-6, 6, 4).repeat(GROUP)[:COLS]
        rows.append(rng.standard_normal(COLS) * 10.0**decades)
    x = torch.from_numpy(np.stack(rows).astype(np.float32)).to(dtype)
    # NaNs of both signs, whatever sign the conversion to `dtype` gave them
    bits = x.view(torch.int16 if x.element_size() == 2 else torch.int32)
    sign = -(2 ** (8 * x.element_size() - 1))
    odd = torch.arange(COLS) % 2 == 1
    bits[torch.isnan(x) & odd] |= sign
    bits[torch.isnan(x) & ~odd] &= ~sign
    return x
