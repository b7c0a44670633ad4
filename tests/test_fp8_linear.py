"""fmo.nn.FP8Linear: forward and backward against float64 autograd (the FP8 recipe's own
error, calc_diff < 1.5e-3: e4m3 rounding of both operands gives ~6.5e-4), and, tightly,
against float64 products of the very operands the recipe quantises (calc_diff < 1e-5: the
layouts of dgrad and wgrad are right); the weight is re-quantised only when it changes."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.nn import fp8_linear as mod
from fastmoe_ops.reference import fp8 as ref

from conftest import cpu_engines
from fp8_gemm_util import dequantised_oracle, float64_reference


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward(engine, dtype):
    seed = 17
    torch.manual_seed(seed)
    layer = fmo.nn.FP8Linear(272, 144, dtype=dtype)          # K = 272: a partial K block
    x = torch.randn(3, 31, 272, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()  # M = 93: ragged
    dy = torch.randn(3, 31, 144, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with fmo.use_backend(engine):
        y = layer(x)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == (3, 31, 144)
    y64, dx64, dw64, db64 = float64_reference(layer, x, dy)
    for name, got, want in (("y", y, y64), ("dx", x.grad, dx64), ("dW", layer.weight.grad, dw64)):
        d = ref.calc_diff(got, want)
        assert d < 1.5e-3, f"{name}: calc_diff {d:.3g} vs float64 autograd ({engine}, {dtype}, seed {seed})"
    assert ref.calc_diff(layer.bias.grad, db64) < (1e-5 if dtype == torch.float32 else 1e-4)
    if dtype == torch.float32:  # the tight check: same quantised operands, float64 products
        oy, odx, odw = dequantised_oracle(layer, x.detach().reshape(-1, 272), dy.reshape(-1, 144))
        oy = oy + layer.bias.detach().double()
        for name, got, want in (("y", y.reshape(-1, 144), oy), ("dx", x.grad.reshape(-1, 272), odx), ("dW", layer.weight.grad, odw)):
            d = ref.calc_diff(got, want)
            assert d < 1e-5, f"{name}: calc_diff {d:.3g} vs the dequantised float64 oracle ({engine}, seed {seed})"


def test_weight_requantised_only_when_it_changes(monkeypatch):
    calls = []
    real = mod.quantize_per_block
    monkeypatch.setattr(mod, "quantize_per_block", lambda w, b: calls.append(1) or real(w, b))
    layer = fmo.nn.FP8Linear(32, 16, bias=False, dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 32)
    with fmo.use_backend("reference"):
        layer(x).sum().backward()
        layer(x)
        assert len(calls) == 1, "an unchanged weight is quantised once"
        opt.step()                       # in-place update bumps weight._version
        layer(x)
        assert len(calls) == 2
        with torch.no_grad():
            layer.weight.mul_(2)
        w2 = layer.quantized_weight()
        assert len(calls) == 3 and torch.equal(w2[1], ref.quantize_per_block(layer.weight.detach())[1])


def test_no_bias_and_frozen_input():
    layer = fmo.nn.FP8Linear(64, 32, bias=False, dtype=torch.float32)
    x = torch.randn(5, 64)               # no grad wanted for x: only dW is computed
    with fmo.use_backend("reference"):
        layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (32, 64)


def test_bad_sizes_refused():
    with pytest.raises(fmo.InputError, match="^in_features: expected a positive multiple of 16"):
        fmo.nn.FP8Linear(40, 32)
    with pytest.raises(fmo.InputError, match="^out_features: expected a positive multiple of 16"):
        fmo.nn.FP8Linear(32, 20)
    with pytest.raises(fmo.InputError, match="^x: expected last dimension 32"):
        fmo.nn.FP8Linear(32, 16)(torch.randn(2, 48))
