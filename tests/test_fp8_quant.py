"""FP8 per-token-group quantisation: every engine against an independent float64 model
of e4m3 rounding, and the kernel (sim) bit-exact against the PyTorch reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, cpu_engines
from fp8_contract import e4m3_model


def model_quantize(x: np.ndarray, group: int, pow2: bool, eps: float = 1e-12):
    m, k = x.shape
    groups = math.ceil(k / group)
    xs = np.empty((m, groups), np.float32)
    xq = np.empty((m, k), np.float64)
    for g in range(groups):
        blk = x[:, g * group:(g + 1) * group].astype(np.float32)
        a = np.abs(blk)
        amax = np.where(np.isfinite(a), a, 0).max(axis=1)
        scale = (np.maximum(amax, np.float32(eps)) / np.float32(448.0)).astype(np.float32)
        if pow2:
            scale = (2.0 ** np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
        xs[:, g] = scale
        with np.errstate(invalid="ignore"):
            xq[:, g * group:(g + 1) * group] = e4m3_model((blk / scale[:, None]).astype(np.float32).astype(np.float64))
    return xq, xs


def run(x, group, pow2, engine):
    with fmo.use_backend(engine):
        return fmo.fp8.quantize_per_token_group(x, group, pow2_scale=pow2)


def check_against_model(x: torch.Tensor, group: int, pow2: bool, engine: str, seed) -> None:
    xq, xs = run(x, group, pow2, engine)
    assert xq.dtype == torch.float8_e4m3fn and xs.dtype == torch.float32
    mq, ms = model_quantize(x.float().numpy(), group, pow2)
    np.testing.assert_array_equal(xs.numpy(), ms, err_msg=f"scales, engine {engine}, shape {tuple(x.shape)}, seed {seed}")
    got = xq.double().numpy()
    both_nan = np.isnan(got) & np.isnan(mq)
    bad = ~both_nan & (got != mq)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(f"xq differs from the e4m3 model at {(int(i), int(j))}: got {got[i, j]}, want {mq[i, j]} "
                             f"(x={x[i, j].item()}, scale={ms[i, j // group]}; engine {engine}, shape {tuple(x.shape)}, seed {seed})")


SHAPES = [(1, 128), (3, 256), (5, 200), (7, 40), (33, 384), (2, 1000)]


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_e4m3_model(engine, dtype, shape):
    seed = hash((shape, str(dtype))) % 2**31
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes so the per-group scale matters.
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)
    check_against_model(x, 128, False, engine, seed)


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_group_sizes_and_pow2_scales(engine, group):
    seed = 1234 + group
    x = torch.randn(9, 3 * group + 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    check_against_model(x, group, True, engine, seed)
    _, xs = run(x, group, True, engine)
    mant, _ = np.frexp(xs.numpy())
    assert np.all(mant == 0.5), "pow2 scales must be exact powers of two"


@pytest.mark.parametrize("engine", cpu_engines())
def test_edge_values(engine):
    """Zeros, huge values, +-inf, NaN, subnormals (fp32 and e4m3), exact ties."""
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(7))
    x[0] = 0.0                                   # all-zero row: tiny positive scale, zeros out
    x[1, :128] = 1e30; x[1, 5] = -3e38           # huge finite
    x[2, 3] = float("inf"); x[2, 130] = float("-inf")
    x[3, 7] = float("nan")
    x[4] = torch.randn(256) * 1e-40              # fp32 subnormals
    x[5, :128] = torch.linspace(-448, 448, 128)  # many exactly representable, some ties
    check_against_model(x, 128, False, engine, 7)
    xq, xs = run(x, 128, False, engine)
    assert torch.all(xs > 0) and torch.all(torch.isfinite(xs)), "every scale must be positive and finite"
    assert torch.all(xq[0].float() == 0)
    assert xq[2, 3].float().item() == 448.0 and xq[2, 130].float().item() == -448.0, "+-inf saturates to +-448"
    assert math.isnan(xq[3, 7].float().item()), "NaN stays NaN"
    assert not torch.isnan(xq[3, torch.arange(256) != 7].float()).any(), "a NaN does not spread to its group"


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "misaligned"])
@pytest.mark.parametrize("pow2", [False, True])
def test_sim_kernel_bitexact_vs_reference(dtype, layout, pow2):
    """The kernel's own source on the simulator against the reference: values and scales
    bit for bit. Row-strided and 2-byte-misaligned views select the scalar path."""
    seed = 99
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(37, 520, generator=g).to(dtype) * 3
    x = {"contiguous": base[:, :512], "row_strided": base[:, 8:392], "misaligned": base[:, 1:385]}[layout]
    if layout == "contiguous":
        x = x.contiguous()
    with fmo.use_backend("sim"):
        xq, xs = fmo.fp8.quantize_per_token_group(x, 128, pow2_scale=pow2)
    rq, rs = ref.quantize_per_token_group(x, 128, pow2_scale=pow2)
    assert_bitwise_equal(xs, rs, f"scales ({layout}, {dtype})", seed)
    assert_bitwise_equal(xq, rq, f"values ({layout}, {dtype})", seed)


def test_empty_inputs():
    for engine in cpu_engines():
        with fmo.use_backend(engine):
            xq, xs = fmo.fp8.quantize_per_token_group(torch.empty(0, 256), 128)
        assert xq.shape == (0, 256) and xs.shape == (0, 2)


@pytest.mark.parametrize("bad, arg, fragment", [
    (lambda: torch.zeros(4, 128, dtype=torch.int32) + 1, "x", "dtype"),
    (lambda: torch.randn(128), "x", "2-D"),
    (lambda: torch.randn(128, 4).t(), "x", "contiguous last dimension"),
])
def test_bad_input_refused(bad, arg, fragment):
    with pytest.raises(fmo.InputError, match=rf"^{arg}: expected .*{fragment}|^{arg}: expected a 2-D|^{arg}: expected dtype|^{arg}: expected a contiguous"):
        fmo.fp8.quantize_per_token_group(bad(), 128)


@pytest.mark.parametrize("group", [0, 100, 2048, 128.0])
def test_bad_group_size_refused(group):
    with pytest.raises(fmo.InputError, match="^group_size: expected a power of two in \\[32, 1024\\], got"):
        fmo.fp8.quantize_per_token_group(torch.randn(2, 256), group)


def test_bad_eps_refused():
    with pytest.raises(fmo.InputError, match="^eps: expected a positive finite float"):
        fmo.fp8.quantize_per_token_group(torch.randn(2, 256), 128, eps=0.0)


needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


@needs_sim
def test_sim_under_memcheck_and_racecheck(monkeypatch):
    """The kernel touches only its own tensors (ragged K, misaligned scalar path too)."""
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    base = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for x in (base[:, :296].contiguous(), base[:, 1:201]):
        with fmo.use_backend("sim"):
            xq, xs = fmo.fp8.quantize_per_token_group(x, 128)
        rq, rs = ref.quantize_per_token_group(x, 128)
        assert_bitwise_equal(xs, rs, "scales under memcheck")
        assert_bitwise_equal(xq, rq, "values under memcheck")


@needs_sim
def test_memcheck_catches_a_launcher_that_undersizes_an_output(monkeypatch):
    """The launcher hands the checker exactly its tensors: a scale buffer one group short
    makes the kernel's store land outside every tensor, and the launch says where."""
    from fastmoe_ops.ops import fp8_quant as q
    from fastmoe_ops.runtime.launch import LaunchConfig, launch

    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    x = torch.randn(4, 256)
    xq = torch.empty(4, 256, dtype=torch.float8_e4m3fn)
    xs = torch.empty(4 * 2 - 1)  # one scale short
    spec = q.Fp8GroupQuantSpec("fp32", 128, 4, False)
    params = q.Fp8GroupQuantParams(x=x.data_ptr(), xq=xq.data_ptr(), xs=xs.data_ptr(), rows=4, cols=256,
                                   x_row_stride=256, groups=2, min_amax=1e-12, reserved=0)
    with pytest.raises(fmo.SimError, match=r"fmo_fp8_quant_token_group_fp32_g128_vec4.*out-of-bounds global write of 4 bytes"):
        launch(spec, LaunchConfig.make(1, 256), params, engine="sim", tensors=(x, xq, xs))
