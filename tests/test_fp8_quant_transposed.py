"""x^T quantised per token group (the wgrad operands) without forming x^T: bit-exact
against the per-token-group quantisation of x.t().contiguous() (itself tested against an
independent e4m3 model in test_fp8_quant.py), with zero padding columns up to a multiple of 16."""
from __future__ import annotations

import math

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, cpu_engines, poison_


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(128, 64), (93, 144), (300, 40), (3, 8)])
def test_transposed_matches_quantising_the_transpose(engine, dtype, shape):
    m, k = shape
    seed = m + 3 * k
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-2, 2, k)[None, :]).to(dtype)
    with fmo.use_backend(engine):
        xq_t, xs_t = fmo.fp8.quantize_per_token_group_transposed(x)
    mp = -(-m // 16) * 16
    assert xq_t.shape == (k, mp) and xs_t.shape == (k, math.ceil(m / 128))
    with fmo.use_backend(engine):
        wq, ws = fmo.fp8.quantize_per_token_group(x.t().contiguous())
    assert_bitwise_equal(xs_t, ws, f"scales ({engine}, {dtype})", seed)
    assert_bitwise_equal(xq_t[:, :m].contiguous(), wq, f"values ({engine}, {dtype})", seed)
    assert torch.all(xq_t[:, m:].float() == 0), "padding columns must be zero"


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
@pytest.mark.parametrize("group", [32, 64])
def test_sim_group_sizes_pow2_edge_values_strided(group, monkeypatch):
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    base = torch.randn(150, 90, generator=torch.Generator().manual_seed(group))
    base[:, 3] = 0.0
    base[7, 5] = float("inf"); base[9, 6] = float("nan"); base[11, 7] = 1e30
    x = base[:, 2:82]  # row-strided view
    with fmo.use_backend("sim"):
        xq_t, xs_t = fmo.fp8.quantize_per_token_group_transposed(x, group, pow2_scale=True)
    rq, rs = ref.quantize_per_token_group_transposed(x, group, pow2_scale=True)
    assert_bitwise_equal(xs_t, rs, f"scales (group {group})", group)
    assert_bitwise_equal(xq_t, rq, f"values (group {group})", group)


def test_bad_input():
    with pytest.raises(fmo.InputError, match="^group_size: expected one of"):
        fmo.fp8.quantize_per_token_group_transposed(torch.randn(4, 4), 100)
    with pytest.raises(fmo.InputError, match="^x: expected a contiguous last dimension"):
        fmo.fp8.quantize_per_token_group_transposed(torch.randn(8, 4).t())


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
def test_sim_vector_and_scalar_loads(layout):
    """16-byte loads for aligned rows; a 2-byte-misaligned view takes the scalar path."""
    base = torch.randn(140, 200, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    x = base[:, :136].contiguous() if layout == "contiguous" else base[:, 1:137]
    with fmo.use_backend("sim"):
        xq_t, xs_t = fmo.fp8.quantize_per_token_group_transposed(x)
    rq, rs = ref.quantize_per_token_group_transposed(x)
    assert_bitwise_equal(xs_t, rs, f"scales ({layout})", 6)
    assert_bitwise_equal(xq_t, rq, f"values ({layout})", 6)
