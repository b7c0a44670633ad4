"""The numpy models of the ptx/ wrapper tests (tests/ptx_cases/formats.py) checked against
PyTorch's dtypes, so that the models are not validated only by the code under test: the fp8
decoder on every code, and the exactly representable inputs of the MMA cases.

The shared machinery (a `Case`, its runners, the comparisons, the formats, each family's kernels
and cases) is the helper package tests/ptx_cases/.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ptx_cases.formats import decode_bits, decode_fp8, encode, exact_values


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decoder_matches_torch(fmt):
    bits = np.arange(256, dtype=np.uint8)
    dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    want = torch.from_numpy(bits.copy()).view(dt).double().numpy()
    got = decode_fp8(bits, fmt)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{fmt}: NaN patterns differ"
    assert np.array_equal(got[~nan], want[~nan]), f"{fmt}: decoded values differ"


@pytest.mark.parametrize("fmt", ["bf16", "f16", "e4m3", "e5m2"])
def test_exact_values_are_representable(fmt):
    rng = np.random.default_rng(0)
    v = exact_values(rng, (4096,), fmt)
    assert np.array_equal(decode_bits(encode(v, fmt), fmt), v), f"{fmt}: exact_values() not exact"
