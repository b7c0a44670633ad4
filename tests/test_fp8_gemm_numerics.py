"""The FP8 GEMM's numerics on a CPU, held to the hardware: the wgmma kernel's arithmetic (QGMMA
steps, fp32 promotion per 128 K) reproduces the elements an H200 computed, and the tests'
tolerance (tests/fp8_gemm_util.py, from fastmoe_ops/reference/tensor_core.fp8_gemm_error_bound)
holds what the tensor cores compute while rejecting what a wrong kernel computes, at the K the
GPU tests use.

"What the tensor cores compute" is the numpy model of the hardware's rule
(reference/tensor_core.py, equal bit for bit to the H200's MMA outputs in
tests/test_mma_capture_replay.py) chained as the wgmma kernel does: four m64nNk32 steps per
128-wide K block from zero, then acc = fma(partial, a_scale * b_scale, acc) in fp32
(csrc/gemm/fp8_gemm_mainloop.cuh, promote). No kernel runs in the bound tests, so their shapes
can be the GPU tests' own.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.reference import tensor_core

from fp8_gemm_util import (Oracle, assert_close_to_oracle, contiguous_layout, expert_weights, gemm_oracle,
                           quantised_operands)


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 a * b + c rounded once (as fmaf): the product is exact in float64, the sum's
    rounding error is recovered exactly (TwoSum) and decides a float64 sum that falls on an
    fp32 midpoint."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c = c.astype(np.float64)
    s = p + c
    z = s - p
    e = (p - (s - z)) + (c - z)  # s + e == p + c exactly
    r = s.astype(np.float32)
    lo = np.nextafter(r, np.float32(-np.inf)).astype(np.float64)
    hi = np.nextafter(r, np.float32(np.inf)).astype(np.float64)
    rd = r.astype(np.float64)
    below = (s - rd == (lo - rd) / 2) & (e < 0)  # s is the midpoint under r; the rest is below it
    above = (s - rd == (hi - rd) / 2) & (e > 0)
    return np.where(below, lo, np.where(above, hi, rd)).astype(np.float32)


def hardware_gemm(xq, xs, wq, ws, *, b_scale_rows=128) -> torch.Tensor:
    """fp32 [M, N] as the wgmma kernel computes it: QGMMA steps, promotion per 128 K."""
    a = xq.float().double().numpy()
    b = wq.float().double().numpy()
    m, k = a.shape
    n = b.shape[0]
    kp = -(-k // 32) * 32  # the kernel's smem tiles are zero past K
    a = np.pad(a, ((0, 0), (0, kp - k)))
    b = np.pad(b, ((0, 0), (0, kp - k)))
    b_scale = ws.float().numpy().repeat(b_scale_rows, axis=0)[:n]  # [N, kb]
    acc = np.zeros((m, n), np.float32)
    for kb in range(-(-k // 128)):
        partial = tensor_core.wgmma_fp8(a[:, 128 * kb:128 * kb + 128], b[:, 128 * kb:128 * kb + 128], None)
        scale = (xs.float().numpy()[:, kb:kb + 1] * b_scale[None, :, kb]).astype(np.float32)
        acc = fma_f32(partial, scale, acc)
    return torch.from_numpy(acc)


# Every element the H200 reported on 2026-12-04 (../shared/gpu-runs/h200-2026-12-04/
# 3-gpu_marked_tests_after_launch_fix.log: the wgmma kernel's "worst" elements against the old
# fp32 bound), with the inputs of the tests that produced them (tests/gpu/
# test_fp8_gemm_kernels_gpu.py at commit 47756b9): (what, (m, n, k), seed, b_rows, out dtype,
# (row, col), the device's value).
H200_ELEMENTS = [
    ("dense", (1, 8, 16), 21, False, torch.float32, (0, 0), -0.09141187369823456),
    ("dense", (100, 200, 400), 21, False, torch.bfloat16, (91, 149), 0.034912109375),
    ("dense", (100, 200, 400), 21, False, torch.float32, (98, 36), 90.2686767578125),
    ("dense", (129, 200, 1040), 21, False, torch.bfloat16, (115, 81), 0.0908203125),
    ("dense", (129, 200, 1040), 21, False, torch.float32, (126, 172), 111.17921447753906),
    ("dense", (4096, 2048, 7168), 21, False, torch.bfloat16, (3966, 1534), 0.65625),
    ("dense", (4096, 2048, 7168), 21, False, torch.float32, (4040, 1040), -236.65777587890625),
    ("budget 1", (1200, 250, 400), 22, False, torch.float32, (1184, 21), 53.734130859375),
    ("budget 3", (1200, 250, 400), 22, True, torch.float32, (1183, 241), 75.68001556396484),
    ("contiguous", None, 23, False, torch.bfloat16, (693, 93), -0.00970458984375),
]


def h200_element_operands(what, shape, seed, b_rows, row, col):
    """(xq, xs, wq, ws, b_scale_rows) of the one row and column that make output (row, col)."""
    if what == "contiguous":
        wq3, ws3 = expert_weights(8, 256, 512, seed)
        xq, xs, m_indices = contiguous_layout([5, 0, 130, 64, 1, 0, 300, 7], 512, seed)
        g = int(m_indices[row])
        wq, ws, b_scale_rows = wq3[g], ws3[g], 128
    else:
        m, n, k = shape
        xq, xs, wq, ws = quantised_operands(m, n, k, seed, b_rows=b_rows)
        b_scale_rows = 1 if b_rows else 128
    scale_row = col // b_scale_rows
    return (xq[row:row + 1], xs[row:row + 1], wq[col:col + 1], ws[scale_row:scale_row + 1], b_scale_rows)


@pytest.mark.parametrize("what,shape,seed,b_rows,out_dtype,index,device_value", H200_ELEMENTS,
                         ids=[f"{e[0]}-{e[1]}-{e[5]}" for e in H200_ELEMENTS])
def test_model_reproduces_the_h200s_gemm_elements(what, shape, seed, b_rows, out_dtype, index, device_value):
    """Bit for bit, including the ones 20% off the float64 oracle where partial sums cancel."""
    xq, xs, wq, ws, b_scale_rows = h200_element_operands(what, shape, seed, b_rows, *index)
    got = hardware_gemm(xq, xs, wq, ws, b_scale_rows=1)[0, 0].to(out_dtype).item()
    assert got == device_value, f"{what} {shape} {index}: model {got!r}, H200 {device_value!r}"


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
def test_simulated_kernel_is_the_model_bit_for_bit():
    """The wgmma kernel on the simulator equals the chained model everywhere (so equals the H200
    at the elements above), persistent tiles and ragged edges included."""
    m, n, k = 100, 200, 400
    xq, xs, wq, ws = quantised_operands(m, n, k, 21)
    with fmo.use_backend("sim"):
        y = fmo.fp8.gemm(xq, xs, wq, ws, torch.float32, kernel="wgmma")
    assert torch.equal(y, hardware_gemm(xq, xs, wq, ws))


SHAPES = [(64, 256, 4096), (128, 384, 7168), (32, 200, 400)]  # N > 128: two b-scale blocks


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_the_hardware_result_is_inside_the_bound(m, n, k):
    xq, xs, wq, ws = quantised_operands(m, n, k, seed=k)
    oracle = gemm_oracle(xq, xs, wq, ws)
    y = hardware_gemm(xq, xs, wq, ws)
    assert_close_to_oracle(y, oracle, f"hardware rule {m}x{n}x{k}", k)
    err = (y.double() - oracle.value).abs()
    # the rule's error is real: beyond what fp32 accumulation allowed (the old 1e-5 * max|o|
    # elementwise bound), and a worst case of it is no vacuous bound (measured 0.6-3%)
    assert float(err.max()) > 1e-5 * float(oracle.value.abs().max())
    assert float((err / oracle.bound).max()) > 1e-3


def wrong_scale_results(xq, xs, wq, ws):
    """Results of kernels that index a scale wrongly (what a mutation test plants)."""
    yield "a-scale row g instead of g + 8h", ref.fp8_gemm_oracle(xq, xs[torch.arange(xs.shape[0]) // 16 * 16 + torch.arange(xs.shape[0]) % 8], wq, ws)
    yield "a-scale of the next K block", ref.fp8_gemm_oracle(xq, xs.roll(1, dims=1), wq, ws)
    yield "b-scale of the neighbouring N block", ref.fp8_gemm_oracle(xq, xs, wq, ws.roll(1, dims=0))
    yield "b-scale of the next K block", ref.fp8_gemm_oracle(xq, xs, wq, ws.roll(1, dims=1))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_the_bound_rejects_a_wrong_scale_index(m, n, k):
    xq, xs, wq, ws = quantised_operands(m, n, k, seed=k)
    oracle = gemm_oracle(xq, xs, wq, ws)
    for what, wrong in wrong_scale_results(xq, xs, wq, ws):
        assert not torch.equal(wrong, oracle.value), what  # the planted index really moves
        with pytest.raises(AssertionError, match="worst at"):  # the elementwise bound, not calc_diff
            assert_close_to_oracle(wrong.float(), oracle, what, k)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_the_check_rejects_a_dropped_k_step(m, n, k):
    """A pipeline that skips one 32-wide k-step (a stage consumed twice, say)."""
    xq, xs, wq, ws = quantised_operands(m, n, k, seed=k)
    skipped = xq.clone()
    skipped[:, 32:64] = 0
    with pytest.raises(AssertionError):
        assert_close_to_oracle(ref.fp8_gemm_oracle(skipped, xs, wq, ws).float(), gemm_oracle(xq, xs, wq, ws), "dropped k-step", k)


def test_nan_never_passes():
    xq, xs, wq, ws = quantised_operands(16, 16, 128, seed=1)
    oracle = gemm_oracle(xq, xs, wq, ws)
    y = oracle.value.float().clone()
    y[3, 5] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_to_oracle(y, oracle, "NaN", 1)
    assert_close_to_oracle(oracle.value.float(), Oracle(oracle.value, oracle.bound), "itself", 1)
