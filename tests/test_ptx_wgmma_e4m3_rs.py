"""ptx/wgmma_e4m3_rs.cuh: wgmma m64nNk32 e4m3 with A from registers (the FP8 attention's O += P V).

On the simulator: the GPU conformance cases (tests/ptx_cases/wgmma_e4m3_rs.py; N 64 and 128, random
and structured) bit exact against the numpy QGMMA model with A built by the ISA's fragment map, and
a kernel that builds A by the accumulator's column map instead (the mistake the FP8 attention's key
permutation exists to avoid) fails the check. Offline: the generated asm header is current and the
kernels build for sm_90a with QGMMA and no spills. The GPU run (tests/gpu/test_ptx_conformance.py,
family wgmma_e4m3_rs) is what checks the fragment map against the hardware."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ptx_cases.runners import HEADERS, SimRunner
from ptx_cases.wgmma_e4m3_rs import SOURCE, case, cases

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


def test_generated_asm_header_is_current(capsys):
    sys.path.insert(0, str(ROOT / "ptx"))
    try:
        import gen_wgmma_e4m3_rs
    finally:
        sys.path.pop(0)
    gen_wgmma_e4m3_rs.main()
    assert (ROOT / "ptx" / "wgmma_e4m3_rs_asm.cuh").read_text() == capsys.readouterr().out, \
        "ptx/wgmma_e4m3_rs_asm.cuh is stale: python ptx/gen_wgmma_e4m3_rs.py > ptx/wgmma_e4m3_rs_asm.cuh"


@pytest.mark.parametrize("index", range(3))
def test_fragment_map_bit_exact(runner, index):
    c = cases(77)[index]
    c.check(runner.run(c))


def test_wrong_fragment_map_fails(runner):
    c = case(78, 64, fmap=1, structured=True)
    with pytest.raises(AssertionError, match="differ bitwise"):
        c.check(runner.run(c))


def test_builds_for_sm90a_with_qgmma(tmp_path):
    from fastmoe_ops.runtime import compiler
    from ptx_cases.build import PTXAS_PROPERTIES, compile_sm90a

    if compiler.nvcc_path() is None:
        pytest.skip("nvcc not installed")
    log, cubin = compile_sm90a(HEADERS + SOURCE, tmp_path)
    props = PTXAS_PROPERTIES.findall(log)
    assert len(props) >= 2 and not [p for p in props if int(p[2]) or int(p[3])], f"spills or no report: {props}"
    if compiler.find_cuobjdump() is None:
        return
    sass = compiler.disassemble(cubin)
    rs = [ln for ln in sass.splitlines() if re.search(r"QGMMA\.64x(64|128)x32\S*\s+R\d+,\s*R\d+", ln)]
    assert len(rs) >= 2, "SASS lacks the RS QGMMA (A from registers) for N 64 and 128"
