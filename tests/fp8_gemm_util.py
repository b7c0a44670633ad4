"""Helpers shared by the FP8 GEMM and FP8Linear tests on the simulator (tests/) and on the
GPU (tests/gpu/): seeded quantised operands, the grouped layouts and their float64 oracle,
the closeness check, and FP8Linear's two oracles (a helper module, so test files never
import each other), and the engines and SM budgets the CPU tests run under.

Tolerance of `assert_close_to_oracle`: the kernel and the oracle see the same e4m3 values and
scales, so the differences are the tensor cores' accumulation, the fp32 promotion and the
output rounding. The elementwise bound is derived from the hardware's accumulation rule
(fastmoe_ops/reference/tensor_core.py: fp8_gemm_error_bound; the simulator has the same
arithmetic bit for bit, so CPU and GPU tests share it), plus half a bf16 ulp (2^-8 |o|) for
bf16 out. It is not an fp32 bound: where partial sums cancel a single element may be off by
tens of percent of its value (the H200 showed ~20%) while sitting well inside the bound, which
follows the magnitudes of the terms. tests/test_fp8_gemm_numerics.py shows that the hardware's
result uses 0.6-3% of the bound at the GPU tests' K, and that a wrong scale index (a-scale row,
K block, b-scale block) exceeds it 4.7x or more. calc_diff < 1e-5 guards the aggregate (a
dropped k-step): the H200 measured at most 1.4e-6 on 2026-12-04."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from fastmoe_ops import budget
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.reference import tensor_core

from conftest import cpu_engines

ALIGN = 128  # rows per expert segment of the contiguous grouped layout
KERNELS = ("wgmma", "mma_sync")


def engine_kernels():
    """(engine, kernel): the reference once, the simulator with each kernel."""
    out = []
    for e in cpu_engines():
        out += [pytest.param(e, k, id=f"{e}-{k}") for k in KERNELS] if e == "sim" else [pytest.param(e, None, id=e)]
    return out


@contextlib.contextmanager
def compute_sms(n: int):
    """The SM budget a kernel's heuristic sees: num_sms - comm while communication runs."""
    with budget.comm_sms(budget.SIMULATED_NUM_SMS - n), budget.communication_in_flight():
        assert budget.sm_budget().compute_sms == n
        yield


def quantised_operands(m, n, k, seed, *, b_rows=False):
    """x [m, k] with rows spanning two decades of magnitude, w [n, k]; x per 1x128 group, w
    per 128x128 block (or per 1x128 group with `b_rows`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]
    w = torch.randn(n, k, generator=g) * 0.2
    xq, xs = ref.quantize_per_token_group(x)
    wq, ws = ref.quantize_per_token_group(w) if b_rows else ref.quantize_per_block(w)
    return xq, xs, wq, ws


@dataclass
class Oracle:
    """What a GEMM kernel must produce: the float64 product of the quantised operands and the
    elementwise distance the tensor cores' arithmetic allows from it ([M, N] float64 each)."""

    value: torch.Tensor
    bound: torch.Tensor

    def __getitem__(self, index) -> "Oracle":
        return Oracle(self.value[index], self.bound[index])


def gemm_oracle(xq, xs, wq, ws, *, kernel="wgmma", b_scale_rows=128) -> Oracle:
    """The oracle of y = dequant(xq, xs) @ dequant(wq, ws)^T. kernel: 'wgmma' (the default on
    sm_90a and in the simulator; its bound also covers the mma.sync kernel and the reference)
    or 'mma_sync' (a tighter bound for that kernel)."""
    xq, xs, wq, ws = (t.cpu() for t in (xq, xs, wq, ws))
    return Oracle(ref.fp8_gemm_oracle(xq, xs, wq, ws, b_scale_rows=b_scale_rows),
                  tensor_core.fp8_gemm_error_bound(xq, xs, wq, ws, kernel=kernel or "wgmma", b_scale_rows=b_scale_rows))


def assert_close_to_oracle(y, oracle: Oracle, what, seed):
    y = y.cpu()
    assert not bool(torch.isnan(y).any()), f"{what}: NaN at {tuple(torch.nonzero(torch.isnan(y))[0].tolist())} (seed {seed})"
    bound = oracle.bound + (2.0**-8 * oracle.value.abs() if y.dtype == torch.bfloat16 else 0)
    err = (y.double() - oracle.value).abs()
    if bool((err > bound).any()):
        i, j = divmod(int(torch.argmax(err / bound.clamp_min(1e-300))), y.shape[1])
        raise AssertionError(f"{what}: worst at {(i, j)}: got {y[i, j].item()}, oracle {oracle.value[i, j].item()}, "
                             f"allowed +-{bound[i, j].item():.3g} (shape {tuple(y.shape)}, seed {seed})")
    diff = ref.calc_diff(y, oracle.value)
    assert diff < 1e-5, f"{what}: calc_diff {diff:.3g} >= 1e-5 (seed {seed})"


def expert_weights(groups, n, k, seed):
    """[groups, n, k] e4m3 and [groups, ceil(n/128), ceil(k/128)] fp32, magnitudes per group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, n, k, generator=g) * torch.linspace(0.1, 1.0, groups)[:, None, None]
    q = [ref.quantize_per_block(w[i]) for i in range(groups)]
    return torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])


def contiguous_layout(counts, k, seed):
    """Tokens sorted by expert, each segment padded to ALIGN rows with m_indices = -1."""
    rows, idx = 0, []
    for gi, c in enumerate(counts):
        seg = -(-c // ALIGN) * ALIGN
        idx += [gi] * c + [-1] * (seg - c)
        rows += seg
    m_indices = torch.tensor(idx, dtype=torch.int32)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    xq, xs = ref.quantize_per_token_group(x)
    return xq, xs, m_indices


def contiguous_oracle(xq, xs, wq3, ws3, m_indices, *, kernel="wgmma") -> Oracle:
    """Row m is multiplied by group m_indices[m]'s weights; rows of -1 must be exactly 0."""
    value = torch.zeros(xq.shape[0], wq3.shape[1], dtype=torch.float64)
    bound = torch.zeros_like(value)
    m_indices = m_indices.cpu()
    for g in range(wq3.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            o = gemm_oracle(xq.cpu()[rows], xs.cpu()[rows], wq3[g], ws3[g], kernel=kernel)
            value[rows], bound[rows] = o.value, o.bound
    return Oracle(value, bound)


def float64_reference(layer, x, dy):
    """FP8Linear's layer as torch.nn.functional.linear in float64 autograd, on x's device:
    (y, dx, dW, db or None)."""
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    y64 = torch.nn.functional.linear(x64, w64, b64)
    y64.backward(dy.double())
    return y64, x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def dequantised_oracle(layer, x2, dy2):
    """float64 products of the recipe's quantised operands, computed from the references."""
    wq, ws = ref.quantize_per_block(layer.weight.detach())
    w = ref.dequantize_per_block(wq, ws)
    xq, xs = ref.quantize_per_token_group(x2)
    y = ref.dequantize_per_token_group(xq, xs) @ w.t()
    dq, ds = ref.quantize_per_token_group(dy2)
    dx = ref.dequantize_per_token_group(dq, ds) @ w
    dtq, dts = ref.quantize_per_token_group(dy2.t().contiguous())
    xtq, xts = ref.quantize_per_token_group(x2.t().contiguous())
    dw = ref.dequantize_per_token_group(dtq, dts) @ ref.dequantize_per_token_group(xtq, xts).t()
    return y, dx, dw
