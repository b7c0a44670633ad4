"""The FP8 GEMM kernels the heuristics can pick compile offline with no spills, and their
SASS holds the FP8 tensor-core path. mma.sync kernels (fp8_gemm): QMMA.16832 (native e4m3
mma) on sm_89; on sm_90a ptxas lowers mma.sync e4m3 to F2FP e4m3->f16 unpacks + HMMA.16816,
both with LDSM (ldmatrix) and LDGSTS (cp.async). The Hopper kernels (fp8_gemm_wgmma, what the
launcher runs on sm_90a, csrc/gemm/fp8_gemm_wgmma.cuh): QGMMA (wgmma e4m3), UTMALDG (TMA loads),
SYNCS (mbarriers), USETMAXREG (setmaxnreg), no LDGSTS and no HMMA/QMMA fallback; the
tma_store epilogue's variants UTMASTG (TMA stores, from STS-written staging: no STG when dense),
the registers epilogue's none; and ptxas keeps
their wgmmas asynchronous (no C7514 "wgmma serialized" / C7517 "warpgroup.wait injected" note,
which would undo the overlap of the promotion with the next block's MMAs)."""
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


def test_fp8_gemm_wgmma_kernels_build_without_spills_with_tma_and_qgmma():
    reports = build.build_all("sm_90a", "fp8_gemm_wgmma")
    assert any(r.name.endswith("_tma_store") for r in reports), "the tma_store twins are registered"
    assert {(r.name.split("_")[4], r.name.split("_")[5]) for r in reports} >= {
        ("dense", "bf16"), ("dense", "fp32"), ("contiguous", "bf16"), ("masked", "bf16")}, [r.name for r in reports]
    for r in reports:
        assert r.ok, r.error
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.name} (sm_90a) spills: {r}"
        assert 0 < r.registers <= 255
        if compiler.find_cuobjdump() is not None:
            for fam in ("QGMMA", "UTMALDG", "SYNCS", "USETMAXREG"):
                assert r.sass[fam] > 0, f"{r.name}: no {fam}: {r.sass}"
            assert r.sass["LDGSTS"] == 0, f"{r.name}: cp.async in the TMA kernel: {r.sass}"
            assert r.sass["HMMA"] == 0 and r.sass["QMMA"] == 0, f"{r.name}: an mma.sync path crept in: {r.sass}"
            # the epilogue: TMA stores (UTMASTG) in the staged variant, none in the registers one
            staged = r.name.endswith("_tma_store")
            assert (r.sass["UTMASTG"] > 0) == staged, f"{r.name}: UTMASTG {r.sass['UTMASTG']}"
            if staged and "_dense_" in r.name:  # dense never takes the registers path
                assert r.sass["STG"] == 0 and r.sass["STS"] > 0, f"{r.name}: stores {r.sass}"


def test_fp8_gemm_wgmma_mmas_stay_asynchronous():
    """ptxas serialises wgmmas (and says so) when a non-wgmma instruction may read accumulator
    registers an MMA in flight still writes: the mainloop's structure must not let it."""
    from fastmoe_ops.ops.fp8_gemm import standard_wgmma_specs, tma_store_wgmma_specs

    for spec in (*standard_wgmma_specs(), *tma_store_wgmma_specs()):
        log = compiler.compile_nvcc(spec.stub(), spec.entry_name(), "sm_90a").log
        notes = [ln for ln in log.splitlines() if "C7514" in ln or "C7517" in ln]
        assert not notes, f"{spec.entry_name()}: {notes}"


@pytest.mark.parametrize("op", ["fp8_quant_block", "fp8_quant_token_group_transposed"])
def test_fp8_quant_kernels_build_without_spills(op):
    reports = build.build_all("sm_90a", op)
    assert reports and all(r.ok and r.spill_stores == 0 and r.spill_loads == 0 for r in reports), reports


def test_fp8_gemm_wgmma_tma_store_grouped_views_build_without_spills():
    """The registry holds dense tma_store variants only; the grouped views (masked: the copy of a
    warpgroup's partial rows out of staging) must not spill either, at the largest tile."""
    import dataclasses

    from fastmoe_ops.ops.fp8_gemm import tma_store_wgmma_specs

    cuobjdump = compiler.find_cuobjdump()
    for spec in tma_store_wgmma_specs():
        if (spec.block_m, spec.block_n) != (128, 128):
            continue
        for mode in ("contiguous", "masked"):
            r = build._report(dataclasses.replace(spec, mode=mode), "sm_90a", cuobjdump)
            assert r.ok and r.spill_stores == 0 and r.spill_loads == 0, f"{r.name}: {r.error or r}"
            if cuobjdump is not None:
                assert r.sass["UTMASTG"] > 0 and r.sass["QGMMA"] > 0, f"{r.name}: {r.sass}"
