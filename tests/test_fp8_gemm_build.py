"""The FP8 GEMM kernels the heuristics can pick compile offline with no spills, and their
SASS holds the FP8 tensor-core path: QMMA.16832 (native e4m3 mma) on sm_89; on sm_90a,
ptxas lowers mma.sync e4m3 to F2FP e4m3->f16 unpacks + HMMA.16816 (Hopper's native FP8
tensor-core instruction is wgmma's QGMMA: the later wgmma/TMA kernel). Both: LDSM (ldmatrix)
and LDGSTS (cp.async)."""
from __future__ import annotations

import pytest

from fastmoe_ops import build
from fastmoe_ops.ops import _all  # noqa: F401  (registers the specs)
from fastmoe_ops.runtime import compiler

pytestmark = pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")


@pytest.mark.parametrize("arch, mma", [("sm_90a", "HMMA"), ("sm_89", "QMMA")])
def test_fp8_gemm_kernels_build_without_spills(arch, mma):
    reports = build.build_all(arch, "fp8_gemm")
    assert len(reports) >= 6
    for r in reports:
        assert r.ok, r.error
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.name} ({arch}) spills: {r}"
        assert 0 < r.registers <= 255
        if compiler.find_cuobjdump() is not None:
            assert r.sass[mma] > 0 and r.sass["LDSM"] > 0 and r.sass["LDGSTS"] > 0, f"{r.name} ({arch}): {r.sass}"


@pytest.mark.parametrize("op", ["fp8_quant_block", "fp8_quant_token_group_transposed"])
def test_fp8_quant_kernels_build_without_spills(op):
    reports = build.build_all("sm_90a", op)
    assert reports and all(r.ok and r.spill_stores == 0 and r.spill_loads == 0 for r in reports), reports
