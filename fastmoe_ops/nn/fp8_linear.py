"""FP8Linear: y = x W^T + b with DeepSeek-V3's FP8 recipe, forward and backward.

Layouts (x [M, K] = in_features K, W [N, K] = out_features N, M = tokens):
  forward  y  [M, N] = gemm(x per 1x128 group along K,  W per 128x128 block)
  dgrad    dx [M, K] = gemm(dy per 1x128 group along N, W^T per 128x128 block)
           W^T's block quantisation is the transpose of W's (same blocks), so it is wq.t()
           with ws.t(): no second quantisation of the weight.
  wgrad    dW [N, K] = gemm(dy^T per 1x128 group along M, x^T per 1x128 group along M)
           (b scaled per row: the GEMM's 1 x 128 b-scale mode), both quantised by one kernel
           pass that transposes through shared memory (quantize_per_token_group_transposed);
           M is zero-padded to a multiple of 16 (the GEMM's K), zeros add nothing. Out fp32,
           cast to W's dtype.
  bias     db = dy.sum(0) in fp32.
All three GEMMs accumulate in fp32 with promotion per 128 of their K. Requirements:
in_features % 16 == 0 and out_features % 16 == 0 (they are the GEMMs' K).
The quantised weight is cached and refreshed only when the weight changes (its `_version`
counter, data pointer, device or dtype), so a frozen or not-yet-stepped weight is quantised
once. Error vs float64 autograd (tests/test_fp8_linear.py): calc_diff < 1.5e-3 for y, dx and
dW, about twice the ~6.5e-4 that e4m3 rounding of both operands gives (relative error ~2.5%
RMS each; calc_diff ~ |err|^2 / 2). Against float64 products of the same quantised operands
the kernels agree to calc_diff < 1e-5.
"""
from __future__ import annotations

import math

import torch

from ..errors import expect
from ..ops.fp8_block_quant import quantize_per_block, quantize_per_token_group_transposed
from ..ops.fp8_gemm import gemm
from ..ops.fp8_quant import quantize_per_token_group
from ._fp8_weight_cache import Fp8WeightCache

_OUT = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float32, torch.float16: torch.float32}


def _grads(*grads, inputs: int):
    """The backward's tuple: the given gradients, then None for the remaining inputs."""
    return grads + (None,) * (inputs - len(grads))


def _forward(x, bias, wq, ws):
    """y = x W^T + b: x quantised per 1 x 128 group, the GEMM in fp32, cast to x's dtype."""
    out_dtype = _OUT[x.dtype]
    xq, xs = quantize_per_token_group(x, 128)
    y = gemm(xq, xs, wq, ws, out_dtype=out_dtype)
    if bias is not None:  # in place: y is the GEMM's fresh output (one allocation less per call)
        y.add_(bias if bias.dtype is out_dtype else bias.to(out_dtype))
    return y if out_dtype is x.dtype else y.to(x.dtype)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, wq, ws):
        ctx.save_for_backward(x, wq, ws)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return _forward(x, bias, wq, ws)

    @staticmethod
    def backward(ctx, dy):
        x, wq, ws = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyq, dys = quantize_per_token_group(dy, 128)
            dx = gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), out_dtype=_OUT[x.dtype]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dyq_t, dys_t = quantize_per_token_group_transposed(dy, 128)  # [N, Mp], [N, ceil(M/128)]
            xq_t, xs_t = quantize_per_token_group_transposed(x, 128)     # [K, Mp], [K, ceil(M/128)]: b per row
            dw = gemm(dyq_t, dys_t, xq_t, xs_t, out_dtype=torch.float32).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(x.dtype)
        return _grads(dx, dw, db, inputs=5)


class FP8Linear(torch.nn.Module):
    """Drop-in for torch.nn.Linear computing in FP8 (e4m3) with fine-grained scales.

    x: [..., in_features] bf16/fp16/fp32 -> [..., out_features] in x's dtype. The weight is
    a normal (bf16 by default) parameter; its FP8 copy is cached per weight version."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=torch.bfloat16):
        super().__init__()
        expect(in_features % 16 == 0 and in_features > 0, "in_features", "a positive multiple of 16 (the forward GEMM's K)", in_features)
        expect(out_features % 16 == 0 and out_features > 0, "out_features", "a positive multiple of 16 (the dgrad GEMM's K)", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._fp8_weight = Fp8WeightCache(lambda w: quantize_per_block(w, 128))
        self.reset_parameters()

    def reset_parameters(self) -> None:  # torch.nn.Linear's initialisation
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def quantized_weight(self):
        """(wq [N, K] e4m3, ws [ceil(N/128), ceil(K/128)] fp32), re-quantised only when the
        weight changed since the last call (under torch.compile: in the graph, every call)."""
        return self._fp8_weight.get(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if x.shape[-1] != k or x.dtype not in _OUT:
            expect(x.shape[-1] == k, "x", f"last dimension {k}", tuple(x.shape))
            expect(x.dtype in _OUT, "x", "dtype bfloat16, float16 or float32", x.dtype)
        params = self._parameters  # one dict read each (a Module attribute lookup costs ~0.3 us)
        weight, bias = params["weight"], params.get("bias")
        wq, ws = self._fp8_weight.get(weight)  # quantized_weight()
        flat = x.dim() == 2  # [M, K]: no reshape either way
        x2 = (x if flat else x.reshape(-1, k)).contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                        bias is not None and bias.requires_grad):
            y = _FP8LinearFunction.apply(x2, weight, bias, wq, ws)
        else:  # inference: no autograd node to build (a few microseconds of host time a call)
            y = _forward(x2, bias, wq, ws)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3 1x128/128x128"
