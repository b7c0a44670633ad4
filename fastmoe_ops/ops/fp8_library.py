"""The FP8 ops as torch.library custom ops, so torch.compile(fullgraph=True) traces each as
one opaque node: `torch.ops.fmo.<name>`, each with a fake (meta) implementation giving the
kernels' output shapes, dtypes and (contiguous) strides.

    fmo::fp8_quant_token_group(x, group_size, pow2_scale, eps) -> (xq [M, K], xs [M, ceil(K/g)])
    fmo::fp8_quant_per_block(w, block_size, pow2_scale, eps) -> (wq [N, K], ws [ceil(N/b), ceil(K/b)])
    fmo::fp8_quant_token_group_transposed(x, group_size, pow2_scale, eps) -> (xq_t [K, Mp], xs_t [K, ceil(M/g)])
    fmo::fp8_swiglu_quant_token_group(h, group_size, pow2_scale, eps) -> (aq [T, I], as [T, I/g]), h [T, 2I]
    fmo::fp8_gemm(xq, xs, wq, ws, out_dtype, kernel=None) -> y [M, N]
    fmo::fp8_grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, out_dtype, debug, kernel) -> y [M, N]
    fmo::fp8_grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, out_dtype, expected_m, kernel) -> y [G, Mmax, N]

The public functions (`fmo.fp8.*`) run their eager path directly (a custom op's dispatch
costs tens of microseconds a call, more than the whole launch path) and switch to these
ops only while torch.compile traces them (`torch.compiler.is_compiling()`). Each op's real
implementation is the eager function, so validation, engine choice and the launch are one
code path in both modes. None is differentiable (FP8 operands carry no gradient); the
modules' autograd (FP8Linear, the MoE experts) is built from them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import fp8_block_quant, fp8_gemm, fp8_gemm_grouped, fp8_quant, fp8_swiglu_quant

Tensor = torch.Tensor
E4M3 = torch.float8_e4m3fn


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------- quantisation


def _quantiser(name: str, eager, shapes):
    """fmo::<name>(x, size, pow2_scale, eps) -> (q e4m3, scales fp32): the quantisers
    share a signature; `shapes(rows, cols, size)` gives (q's shape, the scales' shape)."""

    @torch.library.custom_op(f"fmo::{name}", mutates_args=())
    def op(x: Tensor, size: int, pow2_scale: bool, eps: float) -> tuple[Tensor, Tensor]:
        return eager(x, size, pow2_scale=pow2_scale, eps=eps)

    @op.register_fake
    def _(x, size, pow2_scale, eps):
        q_shape, s_shape = shapes(x.shape[0], x.shape[1], size)
        return x.new_empty(q_shape, dtype=E4M3), x.new_empty(s_shape, dtype=torch.float32)

    return op


_quantiser("fp8_quant_token_group", fp8_quant.quantize_per_token_group,
           lambda m, k, g: ((m, k), (m, _cdiv(k, g))))
_quantiser("fp8_quant_per_block", fp8_block_quant.quantize_per_block,
           lambda n, k, b: ((n, k), (_cdiv(n, b), _cdiv(k, b))))
_quantiser("fp8_quant_token_group_transposed", fp8_block_quant.quantize_per_token_group_transposed,
           lambda m, k, g: ((k, _cdiv(m, 16) * 16), (k, _cdiv(m, g))))
_quantiser("fp8_swiglu_quant_token_group", fp8_swiglu_quant.swiglu_quantize_per_token_group,
           lambda t, i2, g: ((t, i2 // 2), (t, i2 // 2 // g)))


# ------------------------------------------------------------------------------- GEMMs


@torch.library.custom_op("fmo::fp8_gemm", mutates_args=())
def _gemm(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, out_dtype: torch.dtype,
          kernel: Optional[str] = None) -> Tensor:
    return fp8_gemm.gemm(xq, xs, wq, ws, out_dtype, kernel=kernel)


@_gemm.register_fake
def _(xq, xs, wq, ws, out_dtype, kernel=None):
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=out_dtype)


@torch.library.custom_op("fmo::fp8_grouped_gemm_contiguous", mutates_args=())
def _grouped_contiguous(xq: Tensor, xs: Tensor, wq3: Tensor, ws3: Tensor, m_indices: Tensor, out_dtype: torch.dtype,
                        debug: bool = False, kernel: Optional[str] = None) -> Tensor:
    return fp8_gemm_grouped.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, out_dtype, debug=debug, kernel=kernel)


@_grouped_contiguous.register_fake
def _(xq, xs, wq3, ws3, m_indices, out_dtype, debug=False, kernel=None):
    return xq.new_empty(xq.shape[0], wq3.shape[1], dtype=out_dtype)


@torch.library.custom_op("fmo::fp8_grouped_gemm_masked", mutates_args=())
def _grouped_masked(xq3: Tensor, xs3: Tensor, wq3: Tensor, ws3: Tensor, masked_m: Tensor, out_dtype: torch.dtype,
                    expected_m: Optional[int] = None, kernel: Optional[str] = None) -> Tensor:
    return fp8_gemm_grouped.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, out_dtype, expected_m=expected_m,
                                                kernel=kernel)


@_grouped_masked.register_fake
def _(xq3, xs3, wq3, ws3, masked_m, out_dtype, expected_m=None, kernel=None):
    return xq3.new_empty(xq3.shape[0], xq3.shape[1], wq3.shape[1], dtype=out_dtype)
