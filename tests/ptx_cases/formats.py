"""The input formats of the ptx/ wrappers as the PTX ISA defines them (IEEE binary16, bfloat16,
OCP FP8 E4M3 / E5M2): encoders through PyTorch and a bit-field decoder written from the format
definition (tests/test_ptx_support.py checks the decoders against PyTorch's dtypes)."""
from __future__ import annotations

import numpy as np
import torch

def bf16_bits(values) -> np.ndarray:
    """uint16 bit patterns of bf16(values) (round to nearest even, via PyTorch)."""
    return torch.tensor(np.asarray(values, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def f16_bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).astype(np.float16).view(np.uint16)


def fp8_bits(values, fmt: str) -> np.ndarray:
    dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    return torch.tensor(np.asarray(values, np.float32)).to(dt).view(torch.uint8).numpy()


def decode_bits(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Exact float64 values of bf16/f16/e4m3/e5m2 bit patterns (the ISA's formats:
    IEEE binary16, bfloat16 = top half of binary32, OCP FP8 E4M3 (no inf) / E5M2)."""
    if fmt == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if fmt == "f16":
        return bits.view(np.float16).astype(np.float64)
    return decode_fp8(bits, fmt)


def decode_fp8(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Bit-field decode written from the format definition (not through PyTorch)."""
    b = bits.astype(np.int64)
    ebits, mbits, bias = (4, 3, 7) if fmt == "e4m3" else (5, 2, 15)
    sign = np.where(b >> 7 & 1, -1.0, 1.0)
    e = (b >> mbits) & ((1 << ebits) - 1)
    m = b & ((1 << mbits) - 1)
    mag = np.where(e == 0, m * 2.0 ** (1 - bias - mbits), (1 + m / 2.0**mbits) * 2.0 ** (e - bias))
    if fmt == "e4m3":
        mag = np.where((e == 15) & (m == 7), np.nan, mag)
    else:
        mag = np.where(e == 31, np.where(m == 0, np.inf, np.nan), mag)
    return sign * mag


def exact_values(rng: np.random.Generator, shape, fmt: str) -> np.ndarray:
    """Small integers in [-7, 7] times 2^[-2, 2]: representable in every input format
    (e5m2 has 2 mantissa bits: 7 = 1.11b x 4), and every mma partial sum over K <= 64 is a
    multiple of 2^-4 below 2^16, hence exact in fp32 whatever the summation order."""
    del fmt
    return rng.integers(-7, 8, size=shape).astype(np.float64) * 2.0 ** rng.integers(-2, 3, size=shape)


def encode(values: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "bf16":
        return bf16_bits(values)
    if fmt == "f16":
        return f16_bits(values)
    return fp8_bits(values, fmt)
