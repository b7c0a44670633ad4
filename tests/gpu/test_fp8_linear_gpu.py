"""fmo.nn.FP8Linear on a GPU (the `cuda` engine): forward (y), dgrad (dx), wgrad (dW) and the
bias gradient against float64 autograd (calc_diff < 1.5e-3: the FP8 recipe's own error, as in
tests/test_fp8_linear.py), and, for fp32 layers, tightly against float64 products of the very
operands the recipe quantises (calc_diff < 1e-5: the layouts of dgrad and wgrad are right; the
H200 ran FP8 GEMMs at calc_diff ~1.4e-6). Ragged M and a partial K block, then a DeepSeek-V3
sized projection; bf16, fp16 and fp32 layers. Every CUDA output starts as NaN
(gpu_util.poison_cuda_allocations). Seconds on one H100/H200."""
from __future__ import annotations

import copy

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from fp8_gemm_util import dequantised_oracle, float64_reference
from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)

pytestmark = needs_cuda
LOOSE = 1.5e-3   # vs float64 autograd: e4m3 rounding of both operands of each GEMM (~6.5e-4)
TIGHT = 1e-5     # vs float64 products of the same quantised operands: accumulation only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead, k, n", [((3, 31), 272, 144),      # M = 93 ragged, K = 272: a partial K block
                                        ((1000,), 2048, 1536)],   # a DeepSeek-V3-sized projection slice
                         ids=["m93_k272_n144", "m1000_k2048_n1536"])
def test_forward_dgrad_wgrad_vs_float64(dtype, lead, k, n):
    seed = 17
    torch.manual_seed(seed)
    layer = fmo.nn.FP8Linear(k, n, dtype=dtype)          # made on the CPU: the same weights on every device
    layer_cpu = copy.deepcopy(layer)
    layer = layer.to(DEV)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype).to(DEV).requires_grad_()
    dy = torch.randn(*lead, n, generator=g).to(dtype).to(DEV)
    y = layer(x)
    y.backward(dy)
    torch.cuda.synchronize()
    where = f"cuda, {dtype}, M={x.numel() // k} K={k} N={n}, seed {seed}"
    assert y.dtype == dtype and y.shape == (*lead, n) and y.device.type == DEV.type
    y64, dx64, dw64, db64 = float64_reference(layer, x, dy)
    for name, got, want in (("y", y, y64), ("dx", x.grad, dx64), ("dW", layer.weight.grad, dw64)):
        assert not bool(got.isnan().any()), f"{name}: NaN ({where})"
        d = ref.calc_diff(got, want)
        assert d < LOOSE, f"{name}: calc_diff {d:.3g} >= {LOOSE} vs float64 autograd ({where})"
    d = ref.calc_diff(layer.bias.grad, db64)
    assert d < (1e-5 if dtype == torch.float32 else 1e-4), f"d bias: calc_diff {d:.3g} ({where})"
    if dtype == torch.float32:   # outputs in fp32: nothing but accumulation between kernel and oracle
        x2, dy2 = x.detach().reshape(-1, k).cpu(), dy.reshape(-1, n).cpu()
        oy, odx, odw = dequantised_oracle(layer_cpu, x2, dy2)
        oy = oy + layer_cpu.bias.detach().double()
        for name, got, want in (("y", y.reshape(-1, n), oy), ("dx", x.grad.reshape(-1, k), odx), ("dW", layer.weight.grad, odw)):
            d = ref.calc_diff(got.cpu(), want)
            assert d < TIGHT, f"{name}: calc_diff {d:.3g} >= {TIGHT} vs the dequantised float64 oracle ({where})"
