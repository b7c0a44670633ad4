"""Grouped FP8 GEMMs for MoE experts, on the dense GEMM's kernels (modes kContiguous and
kMasked of csrc/gemm/fp8_gemm_wgmma.cuh on sm_90a and the simulator, csrc/gemm/fp8_gemm.cuh
elsewhere; fp8_gemm.kernel_for).

Contiguous (training / prefill: tokens sorted by expert):
    xq [M, K] e4m3, xs [M, ceil(K/128)] fp32, wq3 [G, N, K] e4m3, ws3 [G, ceil(N/128), ceil(K/128)],
    m_indices [M] int32: row m uses group m_indices[m]; -1 marks a padding row (output row 0).
    Layout: each group's rows start at a multiple of contiguous_alignment() (128) and are
    followed by their padding, so an aligned segment holds one group then -1s.
    -> y [M, N]
Masked (decode: a fixed [G, Mmax] slot per expert):
    xq3 [G, Mmax, K], xs3 [G, Mmax, ceil(K/128)], masked_m [G] int32 (rows used per group,
    0 allowed; values above Mmax count as Mmax) -> y [G, Mmax, N]; rows >= masked_m[g] are
    not written (undefined unless `out` is given pre-filled).
"""
from __future__ import annotations

import torch

from .. import backends
from ..errors import expect
from ..reference import fp8 as reference
from ..runtime.plans import PlanCache
from .fp8_gemm import (OUT_DTYPES, GemmPlan, _is_e4m3, contiguous_alignment, kernel_for, select, validate_common,
                       validate_operand, validate_out)


def _validate_int_vector(t, name: str, length: int, device) -> None:
    expect(isinstance(t, torch.Tensor) and t.dtype == torch.int32, name, "an int32 tensor", getattr(t, "dtype", type(t).__name__))
    expect(tuple(t.shape) == (length,) and t.is_contiguous(), name, f"a contiguous tensor of shape ({length},)", tuple(t.shape))
    expect(t.device == device, name, f"a tensor on {device}", t.device)


def check_m_indices(m_indices: torch.Tensor, groups: int) -> None:
    """Debug-mode validation (synchronises): every index in [-1, G); within each aligned
    segment one group's rows first, then only -1 padding. Names the first bad row."""
    idx = m_indices.cpu().long()
    bad = ((idx < -1) | (idx >= groups)).nonzero()
    if bad.numel():
        r = int(bad[0])
        expect(False, "m_indices", f"values in [-1, {groups}) (the group of each row, -1 for padding)", f"{int(idx[r])} at row {r}")
    align = contiguous_alignment()
    for start in range(0, idx.numel(), align):
        seg = idx[start:start + align]
        real = seg >= 0
        if not bool(real.any()):
            continue
        first_pad = int((~real).nonzero()[0]) if bool((~real).any()) else seg.numel()
        if bool(real[first_pad:].any()) or bool((seg[real] != seg[0]).any()) or not bool(real[0]):
            expect(False, "m_indices", f"each {align}-row segment to hold one group's rows followed by -1 padding",
                   f"segment at row {start}: {seg.tolist()[:8]}...")


def grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, out_dtype=torch.bfloat16, *, out=None, debug: bool = False,
                            kernel: str | None = None):
    """y [M, N]: row m = (xq[m] * xs[m]) @ (wq3[g] * ws3[g])^T with g = m_indices[m]; 0 where g = -1.
    debug=True checks m_indices on the host first (a device sync); without it a group index
    outside [-1, G) makes its tile's rows NaN. kernel: "wgmma" | "mma_sync" | None (by device)."""
    if torch.compiler.is_compiling():  # traced as one opaque node: ops/fp8_library.py
        y = torch.ops.fmo.fp8_grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, out_dtype, debug, kernel)
        return y if out is None else out.copy_(y)
    plan = _plans.get(_plans.key(("contiguous", out_dtype, kernel), (xq, xs, wq3, ws3, m_indices)),
                      lambda: _contiguous_plan(xq, xs, wq3, ws3, m_indices, out_dtype, kernel))
    if out is not None:
        validate_out(out, plan.out_shape, out_dtype, xq.device)
    if debug:
        check_m_indices(m_indices, wq3.shape[0])
    if plan.engine == "reference":
        y = reference.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, out_dtype)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(plan.out_shape, dtype=out_dtype, device=plan.device)
    return plan.run(out, xq, xs, wq3, ws3, m_indices=m_indices)


_plans = PlanCache()


def _contiguous_plan(xq, xs, wq3, ws3, m_indices, out_dtype, kernel) -> GemmPlan:
    """Validation, engine and kernel choice of a contiguous grouped GEMM: once per signature."""
    expect(_is_e4m3(xq) and xq.dim() == 2, "xq", "a 2-D float8_e4m3fn tensor [M, K]", f"{getattr(xq, 'dtype', type(xq))} {tuple(getattr(xq, 'shape', ()))}")
    expect(_is_e4m3(wq3) and wq3.dim() == 3, "wq3", "a 3-D float8_e4m3fn tensor [G, N, K]", f"{getattr(wq3, 'dtype', type(wq3))} {tuple(getattr(wq3, 'shape', ()))}")
    m, k = xq.shape
    groups, n = wq3.shape[0], wq3.shape[1]
    validate_operand(xq, xs, "xq", "xs", (), m, k, (m,))
    validate_operand(wq3, ws3, "wq3", "ws3", (groups,), n, k, (-(-n // 128),))
    validate_common(k, out_dtype)
    _validate_int_vector(m_indices, "m_indices", m, xq.device)
    engine = backends.engine_for(xq=xq, xs=xs, wq3=wq3, ws3=ws3, m_indices=m_indices)
    if engine == "reference" or m * n == 0 or groups == 0 or k == 0:  # no groups or K: every row is 0 (or padding)
        return GemmPlan(engine, (m, n), xq.device, zero=groups == 0 or k == 0)
    spec, grid = select("contiguous", kernel or kernel_for(engine, xq.device), m, n, k, OUT_DTYPES[out_dtype], "blk128",
                        groups=groups)
    return GemmPlan.make(spec, grid, engine=engine, m=m, n=n, k=k, b_scale_rows=ws3.shape[-2], groups=groups,
                         out_shape=(m, n), device=xq.device)


def masked_into(out: torch.Tensor, y: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
    """out[g, r] = y[g, r] for r < masked_m[g], else out unchanged: the masked GEMM's `out=`
    semantics from the functional op, without a host read of masked_m (traceable)."""
    rows = torch.arange(y.shape[1], device=y.device)
    keep = rows[None, :, None] < masked_m.to(rows.dtype)[:, None, None]  # [G, Mmax, 1]
    return out.copy_(torch.where(keep, y, out))


def grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, out_dtype=torch.bfloat16, *, out=None, expected_m: int | None = None,
                        kernel: str | None = None):
    """y [G, Mmax, N]: y[g, :masked_m[g]] = (xq3[g] * xs3[g]) @ (wq3[g] * ws3[g])^T for those rows.
    expected_m: typical rows per group, for the tile heuristic (default Mmax).
    kernel: "wgmma" | "mma_sync" | None (by device)."""
    if torch.compiler.is_compiling():  # traced as one opaque node: ops/fp8_library.py
        y = torch.ops.fmo.fp8_grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, out_dtype, expected_m, kernel)
        return y if out is None else masked_into(out, y, masked_m)
    plan = _plans.get(_plans.key(("masked", out_dtype, kernel, expected_m), (xq3, xs3, wq3, ws3, masked_m)),
                      lambda: _masked_plan(xq3, xs3, wq3, ws3, masked_m, out_dtype, expected_m, kernel))
    if out is not None:
        validate_out(out, plan.out_shape, out_dtype, xq3.device)
    if plan.engine == "reference":
        y = reference.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, out_dtype)
        return y if out is None else masked_into(out, y, masked_m)
    if out is None:
        out = torch.empty(plan.out_shape, dtype=out_dtype, device=plan.device)
    return plan.run(out, xq3, xs3, wq3, ws3, masked_m=masked_m)


def _masked_plan(xq3, xs3, wq3, ws3, masked_m, out_dtype, expected_m, kernel) -> GemmPlan:
    """Validation, engine and kernel choice of a masked grouped GEMM: once per signature."""
    expect(_is_e4m3(xq3) and xq3.dim() == 3, "xq3", "a 3-D float8_e4m3fn tensor [G, Mmax, K]", f"{getattr(xq3, 'dtype', type(xq3))} {tuple(getattr(xq3, 'shape', ()))}")
    expect(_is_e4m3(wq3) and wq3.dim() == 3, "wq3", "a 3-D float8_e4m3fn tensor [G, N, K]", f"{getattr(wq3, 'dtype', type(wq3))} {tuple(getattr(wq3, 'shape', ()))}")
    groups, mmax, k = xq3.shape
    n = wq3.shape[1]
    expect(wq3.shape[0] == groups, "wq3", f"{groups} groups (like xq3)", wq3.shape[0])
    validate_operand(xq3, xs3, "xq3", "xs3", (groups,), mmax, k, (mmax,))
    validate_operand(wq3, ws3, "wq3", "ws3", (groups,), n, k, (-(-n // 128),))
    validate_common(k, out_dtype)
    _validate_int_vector(masked_m, "masked_m", groups, xq3.device)
    engine = backends.engine_for(xq3=xq3, xs3=xs3, wq3=wq3, ws3=ws3, masked_m=masked_m)
    if engine == "reference" or groups * mmax * n == 0 or k == 0:
        return GemmPlan(engine, (groups, mmax, n), xq3.device, zero=k == 0)
    spec, grid = select("masked", kernel or kernel_for(engine, xq3.device), mmax, n, k, OUT_DTYPES[out_dtype], "blk128",
                        groups=groups, heuristic_m=expected_m)
    return GemmPlan.make(spec, grid, engine=engine, m=mmax, n=n, k=k, b_scale_rows=ws3.shape[-2], groups=groups,
                         out_shape=(groups, mmax, n), device=xq3.device)
