"""Fused SwiGLU + per-token-group FP8 quantisation (csrc/quant/swiglu_quant.cuh) against a
float64 oracle: a64 = silu(gate) * up in float64, then the quantisation contract
(quantize_per_token_group of a64 rounded to fp32).

Tolerance, from the arithmetic (the kernel header derives it): the engines compute `a` in fp32
with one non-correctly-rounded step (expf: 2 ulp on CUDA, libm here; torch's on `reference`),
so |a32 - a64| <= DELTA |a64| with DELTA = 8 * 2^-24. Hence
  - where that fp32 product is exact (gate 0, gate >= 32 so that 1 + e^-g rounds to 1, gate
    <= -128 so that silu rounds to -0, NaN/inf, bf16 operands whose product fits 24 bits),
    the result equals the oracle's quantisation bit for bit, scales included;
  - elsewhere the group's amax moves by at most DELTA relative, so its scale lies in
    [RN32(amax(1 - DELTA)/448), RN32(amax(1 + DELTA)/448)] (a few fp32 ulps), and each code
    lies between the e4m3 roundings of a64(1 -+ DELTA) / scale: the same code unless the
    quotient sits within ~1e-6 (relative) of an e4m3 rounding boundary, then one of the two
    neighbours. That is at most one e4m3 ulp, and we also check that the bracket never spans
    more than that.
CI cost: ~2 s (small shapes on the simulator)."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import fp8_swiglu_quant as op
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, cpu_engines, poison_
from fp8_swiglu_util import check_within_bound, exact_h, oracle, random_h

needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def run(h, engine, group=128, pow2=False, out=None):
    with fmo.use_backend(engine):
        return fmo.fp8.swiglu_quantize_per_token_group(h, group, pow2_scale=pow2, out=out)


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t, inter", [(1, 128), (37, 256), (130, 384), (0, 128)])
def test_random_within_one_ulp_of_float64(engine, dtype, t, inter):
    seed = 1000 * t + inter
    h = random_h(t, inter, dtype, seed)
    aq, as_ = run(h, engine)
    assert aq.dtype == torch.float8_e4m3fn and aq.shape == (t, inter) and as_.shape == (t, inter // 128)
    if t:
        exact = check_within_bound(h, aq, as_, 128, False, f"{engine}, {dtype}, T {t}, I {inter}, seed {seed}")
        # Off-by-one codes need a quotient within ~1e-6 of a boundary: rare (not vacuous).
        assert exact > 0.99, f"only {exact:.4f} of the codes equal the oracle's ({engine}, seed {seed})"


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_exact_products_bitexact(engine, dtype, pow2):
    seed = 5 + pow2
    h = exact_h(9, 256, dtype, seed)
    aq, as_ = run(h, engine, pow2=pow2)
    _, rq, rs = oracle(h, 128, pow2)
    assert_bitwise_equal(as_, rs, f"scales ({engine}, {dtype}, pow2 {pow2})", seed)
    assert_bitwise_equal(aq, rq, f"codes ({engine}, {dtype}, pow2 {pow2})", seed)
    assert aq[0, 3].float().item() == -448.0, "+inf gate times -1.5 saturates to -448"
    assert aq.view(torch.uint8)[1, 5].item() == 0x7F and aq.view(torch.uint8)[2, 7].item() == 0x7F, "NaN code"


@needs_sim
@pytest.mark.parametrize("layout", ["row_strided", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sim_strided_and_scalar_paths_poisoned(layout, dtype):
    """Padded rows (vector path) and a 2-byte-misaligned view (scalar path), into poisoned
    outputs: every code and scale is written, and within the bound."""
    t, inter, seed = 33, 256, 77
    h = random_h(t, inter, dtype, seed, stride_pad=8, offset=0 if layout == "row_strided" else 1)
    assert h.stride(0) == 2 * inter + 8 + (layout == "misaligned")
    out = (poison_(torch.empty(t, inter, dtype=torch.float8_e4m3fn)), poison_(torch.empty(t, inter // 128)))
    aq, as_ = run(h, "sim", out=out)
    assert aq is out[0] and as_ is out[1]
    check_within_bound(h, aq, as_, 128, False, f"sim {layout} {dtype}, seed {seed}")


@needs_sim
def test_sim_poisoned_ragged_exact():
    """Row counts that leave the last CTA partly idle, every output poisoned first."""
    for t in (1, 5, 17, 65):
        h = exact_h(t, 384, torch.bfloat16, t)
        out = (poison_(torch.empty(t, 384, dtype=torch.float8_e4m3fn)), poison_(torch.empty(t, 3)))
        run(h, "sim", out=out)
        _, rq, rs = oracle(h)
        assert_bitwise_equal(out[1], rs, f"scales T={t}", t)
        assert_bitwise_equal(out[0], rq, f"codes T={t}", t)


@needs_sim
def test_sim_under_memcheck_and_racecheck(monkeypatch):
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    h = exact_h(5, 128, torch.bfloat16, 3)
    aq, as_ = run(h, "sim")
    _, rq, rs = oracle(h)
    assert_bitwise_equal(as_, rs, "scales under memcheck")
    assert_bitwise_equal(aq, rq, "codes under memcheck")
    h = random_h(3, 128, torch.float32, 4, stride_pad=4, offset=1)   # the scalar path
    check_within_bound(h, *run(h, "sim"), 128, False, "sim under memcheck, scalar path")


@pytest.mark.parametrize("bad, kw, arg, fragment", [
    (lambda: torch.ones(4, 256, dtype=torch.int32), {}, "h", "dtype"),
    (lambda: torch.randn(256), {}, "h", "2-D"),
    (lambda: torch.randn(4, 200), {}, "h", "I a multiple of group_size=128"),
    (lambda: torch.randn(4, 384), {}, "h", "I a multiple of group_size=128"),
    (lambda: torch.randn(256, 4).t(), {}, "h", "contiguous last dimension"),
    (lambda: torch.randn(1024).as_strided((4, 256), (128, 1)), {}, "h", "non-overlapping rows"),
    (lambda: torch.randn(4, 256), {"group_size": 100}, "group_size", "power of two"),
    (lambda: torch.randn(4, 256), {"eps": 0.0}, "eps", "positive finite float"),
    (lambda: torch.randn(4, 256), {"pow2_scale": 1}, "pow2_scale", "a bool"),
    (lambda: torch.randn(4, 256), {"out": (torch.empty(4, 128), torch.empty(4, 1))}, "out\\[0\\] \\(aq\\)", "float8_e4m3fn"),
    (lambda: torch.randn(4, 256), {"out": (torch.empty(4, 128, dtype=torch.float8_e4m3fn), torch.empty(4, 2))},
     "out\\[1\\] \\(as\\)", "shape \\(4, 1\\)"),
])
@pytest.mark.parametrize("engine", cpu_engines())
def test_bad_input_refused_before_any_kernel(monkeypatch, engine, bad, kw, arg, fragment):
    def no_launch(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(op, "launch", no_launch)
    monkeypatch.setattr(ref, "swiglu_quantize_per_token_group", no_launch)
    with fmo.use_backend(engine), pytest.raises(fmo.InputError, match=rf"^{arg}: expected .*{fragment}"):
        fmo.fp8.swiglu_quantize_per_token_group(bad(), **kw)


def test_custom_op_fake_shapes():
    """torch.compile sees the op through its fake: shapes and dtypes as the kernel's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        aq, as_ = torch.ops.fmo.fp8_swiglu_quant_token_group(torch.empty(7, 512, dtype=torch.bfloat16), 128, False, 1e-12)
    assert aq.shape == (7, 256) and aq.dtype == torch.float8_e4m3fn and as_.shape == (7, 2) and as_.dtype == torch.float32
