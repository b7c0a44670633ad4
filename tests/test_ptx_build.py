"""The GPU side of the ptx/ wrappers, checked offline: every test kernel of tests/ptx_cases/
(the kernels of tests/test_ptx_*.py) and the benchmark GEMM compile with nvcc for sm_90a
without spills, and their SASS holds the instructions the wrappers promise (HMMA for mma.sync,
LDSM/.MT88 for ldmatrix{,.trans}, LDGSTS with ZFILL/BYPASS for cp.async, FTZ f32 atomics,
BAR.ARV, ...). Needs nvcc (no GPU); the SASS checks need cuobjdump. Skipped without nvcc, like
the build report's test.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from fastmoe_ops.runtime import compiler

from ptx_cases import barrier, cp_async, ld_st, ldmatrix, mma, tma
from ptx_cases.build import PTXAS_PROPERTIES, compile_sm90a
from ptx_cases.runners import HEADERS

pytestmark = pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")

ROOT = Path(__file__).resolve().parents[1]


def _bench_gemm_source() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_sim
    finally:
        sys.path.pop(0)
    return bench_sim.HEADERS + bench_sim.GEMM


SOURCES = {
    "mma": (HEADERS + mma.SOURCE, ["HMMA.16816.F32.BF16", "HMMA.16816.F32", "F2FP.F16.E4M3.UNPACK_B",
                                   "F2FP.F16.E5M2.UNPACK_B", "LDSM.16.M88.4", "LDSM.16.M88.2"]),
    "ldmatrix": (HEADERS + ldmatrix.SOURCE, ["LDSM.16.M88", "LDSM.16.M88.2", "LDSM.16.M88.4", "LDSM.16.MT88",
                                             "LDSM.16.MT88.2", "LDSM.16.MT88.4"]),
    "cp_async": (HEADERS + cp_async.SOURCE, ["LDGSTS.E.ZFILL", "LDGSTS.E.64.ZFILL", "LDGSTS.E.128.ZFILL",
                                             "LDGSTS.E.BYPASS.128", "LDGSTS.E.BYPASS.128.ZFILL", "LDGDEPBAR",
                                             "DEPBAR.LE"]),
    "ld_st": (HEADERS + ld_st.SOURCE, ["LDG.E.128.CONSTANT", "LDG.E.NA.LTC128B.128.CONSTANT", "STG.E.NA.128",
                                       "ATOM.E.ADD.F32.FTZ.RN.STRONG.GPU", "ATOM.E.CAS.64.STRONG.GPU",
                                       "ATOM.E.EXCH.STRONG.GPU", "MEMBAR.ALL.SYS"]),
    "barrier": (HEADERS + barrier.SOURCE, ["BAR.ARV", "BAR.SYNC.DEFER_BLOCKING", "MEMBAR.SC.GPU",
                                           "MEMBAR.ALL.GPU", "MEMBAR.ALL.CTA"]),
    "tma": (HEADERS + tma.SOURCE, ["UTMALDG.2D", "UTMALDG.3D", "UTMASTG.2D", "UTMAREDG.2D.ADD", "UTMACMDFLUSH",
                                   "SYNCS.ARRIVE.TRANS64.A1T0", "SYNCS.PHASECHK.TRANS64.TRYWAIT", "ELECT",
                                   "STSM.16.M88.4", "STSM.16.MT88.4"]),
    "bench_gemm": (None, ["HMMA.16816.F32.BF16", "LDSM.16.M88.4", "LDGSTS.E.BYPASS.128", "DEPBAR.LE"]),
}


@pytest.mark.parametrize("family", list(SOURCES))
def test_compiles_for_sm90a_without_spills_and_emits_expected_sass(family, tmp_path):
    source, want_ops = SOURCES[family]
    if source is None:
        source = _bench_gemm_source()
    log, cubin = compile_sm90a(source, tmp_path)
    props = PTXAS_PROPERTIES.findall(log)
    assert props, f"{family}: no ptxas function properties in the log:\n{log[-2000:]}"
    spilling = [(name, st, ld) for name, _, st, ld in props if int(st) or int(ld)]
    assert not spilling, f"{family}: kernels spill (name, store bytes, load bytes): {spilling}"
    if compiler.find_cuobjdump() is None:
        return
    sass = compiler.disassemble(cubin)
    ops = set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    missing = [op for op in want_ops if op not in ops]
    assert not missing, f"{family}: SASS lacks {missing}; it has {sorted(o for o in ops if o[:3] in {'HMM', 'LDS', 'LDG', 'ATO', 'BAR', 'MEM', 'F2F', 'DEP', 'STG'})}"


def test_tma_ring_kernel_sass_counts(tmp_path):
    """The producer/consumer ring (tests/ptx_cases/tma.py: tma_ring) compiled for sm_90a, counted
    with the build report's SASS families: TMA loads and mbarrier (SYNCS) ops, elect.sync, no
    cp.async (LDGSTS), no spills."""
    if compiler.find_cuobjdump() is None:
        pytest.skip("cuobjdump not installed")
    src = HEADERS + tma.SOURCE.replace('extern "C" __global__ void tma_ring', 'extern "C" __global__ void __launch_bounds__(96) tma_ring')
    log, cubin = compile_sm90a(src, tmp_path)
    ring = [p for p in PTXAS_PROPERTIES.findall(log) if p[0] == "tma_ring"]
    assert ring and ring[0][2:] == ("0", "0"), f"tma_ring spills or is missing: {ring}"
    sass = compiler.disassemble(cubin)
    body = sass.split("Function : tma_ring")[1].split("Function :")[0]
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body)
    counts = {fam: ops.count(fam) for fam in ("UTMALDG", "SYNCS", "ELECT", "LDGSTS", "UTMASTG")}
    assert counts["UTMALDG"] > 0 and counts["SYNCS"] >= 3 and counts["ELECT"] > 0, counts
    assert counts["LDGSTS"] == 0, counts
    print("tma_ring SASS:", counts)
