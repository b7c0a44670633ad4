"""The attention kernels (every registered variant) compile offline for sm_90a with no
spills and no stack frame, and their SASS holds HMMA (mma.sync), LDSM (ldmatrix) and
LDGSTS (cp.async); the delta kernel is a plain reduction (no MMA). The sm_90a forward
(hopper_fwd.cuh) holds HGMMA (wgmma), UTMALDG (TMA loads) and USETMAXREG, no spills."""
from __future__ import annotations

import pytest

from fastmoe_ops import build
from fastmoe_ops.ops import _all  # noqa: F401  (registers the specs)
from fastmoe_ops.runtime import compiler

pytestmark = pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")


def test_attention_kernels_build_without_spills():
    reports = build.build_all("sm_90a", "attn")
    assert len(reports) == 40  # 4 kernels x 2 dtypes x 3 (Dqk, Dv) x causal (delta: no causal)
    for r in reports:
        assert r.ok, r.error
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.name} spills: {r}"
        assert 0 < r.registers <= 255
        if compiler.find_cuobjdump() is not None and "delta" not in r.name:
            assert r.sass["HMMA"] > 0 and r.sass["LDSM"] > 0 and r.sass["LDGSTS"] > 0, f"{r.name}: {r.sass}"


def check_hopper_build(op: str, count: int, mma: str, absent: tuple[str, ...]):
    """Every variant of a Hopper attention op: builds, no spills or stack frame, and (with
    cuobjdump) its SASS holds `mma`, UTMALDG and USETMAXREG and none of `absent`."""
    reports = build.build_all("sm_90a", op)
    assert len(reports) == count
    for r in reports:
        assert r.ok, r.error
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack_frame == 0, f"{r.name} spills: {r}"
        assert 0 < r.registers <= 255
        if compiler.find_cuobjdump() is not None:
            assert r.sass[mma] > 0 and r.sass["UTMALDG"] > 0 and r.sass["USETMAXREG"] > 0, f"{r.name}: {r.sass}"
            assert all(r.sass[name] == 0 for name in absent), f"{r.name}: none of {absent}: {r.sass}"


def test_hopper_forward_builds_with_hgmma_and_tma():
    # {bf16, fp16} x (64, 64), (128, 128), (192, 128), (256, 256) x causal x GQA-packed; no mma.sync / cp.async
    check_hopper_build("attn_fwd_sm90", 32, "HGMMA", ("HMMA", "LDGSTS"))


def test_fp8_forward_builds_with_qgmma_and_tma():
    """The sm_90a FP8 forward (hopper_fwd_fp8.cuh): QGMMA (S = Q K^T by descriptors, O += P V with P
    in registers), UTMALDG (Q, K, V by TMA), USETMAXREG, no spills, no stack frame."""
    check_hopper_build("attn_fwd_fp8_sm90", 4, "QGMMA", ("HGMMA", "HMMA", "LDGSTS"))  # D 64, 128 x causal; no 16-bit MMA, no cp.async
