"""The FP8 quantisation contract (csrc/quant/fp8_scale.cuh) bit for bit on the CPU: the
PyTorch reference and the kernels on the simulator (per token group, per block, transposed;
bf16/fp16/fp32; pow2 scales; vectorised and scalar paths) against an independent numpy
derivation (tests/fp8_contract.py), on inputs that stress every clause: ties between e4m3
codes, saturation, subnormals, zeros of both signs, NaN of both signs, +-inf, the eps floor,
ragged last groups. Guards make sure the inputs tell the contract from its look-alikes
(a reciprocal-multiply scale, one rounding of the exact quotient), so the tests can fail.
The same checks on CUDA: tests/gpu/test_fp8_quant_contract_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal
from fp8_contract import (MIDPOINTS, VALUES, assert_matches_contract, contract_quantize, contract_scales, e4m3_codes,
                          edge_inputs, fp32_quotient, layout_of)

OPS = {"token_group": fmo.fp8.quantize_per_token_group, "block": fmo.fp8.quantize_per_block,
       "transposed": fmo.fp8.quantize_per_token_group_transposed}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def run(op: str, x: torch.Tensor, size: int, pow2: bool, eps: float, engine: str):
    with fmo.use_backend(engine):
        return OPS[op](x, size, pow2_scale=pow2, eps=eps)


# ------------------------------------------------------------------ the model and the inputs


def test_model_rounds_as_e4m3_is_defined():
    """Every code value maps to itself, every midpoint to the even neighbour, and random
    fp32 values agree with c10's conversion (another implementation) inside +-448."""
    codes = np.arange(0x7F, dtype=np.uint8)
    np.testing.assert_array_equal(e4m3_codes(VALUES.astype(np.float32)), codes)
    np.testing.assert_array_equal(e4m3_codes(-VALUES.astype(np.float32)), codes | 0x80)
    ties = e4m3_codes(MIDPOINTS.astype(np.float32))
    assert np.all(ties % 2 == 0) and np.all((ties == codes[:-1]) | (ties == codes[1:]))
    specials = np.array([464, 1e30, np.inf, -np.inf, np.nan, -np.nan, -0.0, -2.0**-11, 2.0**-10, 3 * 2.0**-10], np.float32)
    np.testing.assert_array_equal(e4m3_codes(specials), [0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0x7F, 0x80, 0x80, 0x00, 0x02])
    rng = np.random.default_rng(5)
    y = np.concatenate([rng.uniform(-448, 448, 100_000), rng.uniform(-2.0**-6, 2.0**-6, 100_000)]).astype(np.float32)
    np.testing.assert_array_equal(e4m3_codes(y), torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_inputs_tell_the_contract_from_its_look_alikes(dtype):
    """Without these properties a test below could pass on a wrong implementation."""
    x = edge_inputs(dtype)
    codes, scales = contract_quantize("token_group", x, 128, pow2=False)
    xf = x.float().numpy()
    a = np.abs(np.pad(xf, ((0, 0), (0, 512 - xf.shape[1]))).reshape(x.shape[0], 4, 128))
    amax = np.where(np.isfinite(a), a, 0).max(axis=2).astype(np.float32)
    reciprocal = (np.maximum(amax, np.float32(1e-12)) * (np.float32(1) / np.float32(448))).astype(np.float32)
    assert (reciprocal != scales).sum() > 10, "scales must differ between amax / 448 and amax * (1 / 448)"
    assert (contract_scales(amax, 1e-12, True) != scales).any(), "pow2 must change some scales"
    quotient = fp32_quotient(xf, np.repeat(scales, 128, 1)[:, :xf.shape[1]])
    assert np.isin(np.abs(quotient), MIDPOINTS).sum() > 300, "x / scale must land on e4m3 ties"
    assert ((codes & 0x7F) == 0x7E).sum() > 20 and ((codes & 0x7F) < 8).sum() > 200, "saturation and e4m3 subnormals"
    nan = np.isnan(xf)
    assert np.signbit(xf[nan]).any() and not np.signbit(xf[nan]).all(), "NaN of both signs"
    assert np.isin(codes, [0x80]).any() and np.isin(codes, [0xFE]).any(), "-0 and -448 codes"
    if dtype == torch.float32:
        # Ties that exist only after rounding x / scale to fp32: one rounding of the exact
        # quotient (x * (1 / scale), or a fused remainder) would pick the other neighbour.
        s64 = np.repeat(scales, 128, 1)[:, :xf.shape[1]].astype(np.float64)
        tie = np.isin(np.abs(quotient), MIDPOINTS)
        i = np.searchsorted(MIDPOINTS, np.abs(quotient))          # the tie between codes i and i + 1
        with np.errstate(invalid="ignore"):  # inf - inf: not a tie anyway
            side = np.abs(xf.astype(np.float64)) - np.abs(quotient.astype(np.float64)) * s64  # sign exact
        once = np.where(side > 0, i + 1, i)
        even = i + i % 2
        assert (tie & (side != 0) & (once != even)).sum() > 10, "double rounding must matter"


# ------------------------------------------------------------------ reference and kernels


@pytest.mark.parametrize("op, size", [("token_group", 128), ("token_group", 32), ("block", 128), ("block", 32),
                                      ("transposed", 128), ("transposed", 32)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_reference_is_the_contract(op, size, dtype, pow2, eps):
    x = edge_inputs(dtype)
    assert_matches_contract(run(op, x, size, pow2, eps, "reference"), contract_quantize(op, x, size, pow2=pow2, eps=eps),
                            f"reference {op} {size} {dtype} pow2={pow2} eps={eps}")


@needs_sim
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pow2, layout, eps", [(False, "contiguous", 1e-12), (True, "contiguous", 1e-12),
                                               (False, "misaligned", 0.5)])
def test_sim_kernel_is_the_contract(op, dtype, pow2, layout, eps):
    """The kernel's own source on the simulator: equal to the contract and to the reference."""
    x = layout_of(edge_inputs(dtype), layout)
    got = run(op, x, 128, pow2, eps, "sim")
    what = f"sim {op} {dtype} pow2={pow2} {layout} eps={eps}"
    assert_matches_contract(got, contract_quantize(op, x, 128, pow2=pow2, eps=eps), what)
    want = run(op, x, 128, pow2, eps, "reference")
    assert_bitwise_equal(got[1], want[1], f"{what}: scales vs reference")
    assert_bitwise_equal(got[0], want[0], f"{what}: codes vs reference")


@pytest.mark.parametrize("eps", [0.0, 1e-40, 5e-36, 1e39, float("inf"), float("nan"), 1])
def test_eps_outside_the_contract_refused(eps):
    """eps / 448 must be a normal fp32 so every scale is positive and normal."""
    for fn in OPS.values():
        with pytest.raises(fmo.InputError, match="^eps: expected a positive finite float"):
            fn(torch.randn(4, 256), 128, eps=eps)
    assert ref.EPS_MIN < 5.3e-36 and np.float32(ref.EPS_MIN) / np.float32(448) == np.float32(2.0**-126)
