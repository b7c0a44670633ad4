"""ptx/wgmma_bf16.cuh: wgmma.mma_async m64nNk16 with bf16/f16 inputs, SS and RS forms.

What is checked now: the generated asm header is what ptx/gen_wgmma_bf16.py writes; the test
kernels build for sm_90a without spills and their SASS has HGMMA for every N and form (SS and RS,
bf16 and f16); on the simulator every form refuses clearly (no emulation yet: ptx/wgmma_bf16.cuh
says why) instead of computing anything.
The execution half of the emulation (sim_detail::wgmma16_execute, one op, called synchronously by a
test kernel) is checked bit for bit against the numpy model (tensor_core.dot_add, HMMA's rule,
assumed for HGMMA) and float64 on small integers: K-major rows through every swizzle with padded
LBO/SBO, MN-major (trans) operands through the ISA's canonical layouts, A from the RS fragment,
N 64..256, bf16 and f16, scale-d. The emulation's layout readers and this file's numpy layout
models are written from the same ISA tables: a misreading of the ISA shared by both shows only in
a GPU conformance run (none yet: the conformance test also runs each case through the wrappers on
the simulator, which refuse until the queue hook exists).
Not yet: the asynchronous semantics (queue, commit, wait) for 16-bit ops; see ptx/README.md.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ptx_cases.case import poisoned
from ptx_cases.runners import HEADERS, SimRunner
from ptx_cases.wgmma_bf16 import SIZES, SOURCE

ROOT = Path(__file__).resolve().parents[1]


def test_generated_asm_header_is_current():
    sys.path.insert(0, str(ROOT / "ptx"))
    try:
        import gen_wgmma_bf16
    finally:
        sys.path.pop(0)
    assert (ROOT / "ptx" / "wgmma_bf16_asm.cuh").read_text() == gen_wgmma_bf16.text(), \
        "ptx/wgmma_bf16_asm.cuh is stale: run python ptx/gen_wgmma_bf16.py"


def test_wgmma_bf16_kernels_compile_for_sm90a_with_hgmma(tmp_path):
    """The GPU side offline (nvcc, no GPU): every test kernel builds for sm_90a without spills, and
    the SASS has HGMMA for each N in SS form (both operands by descriptor) and RS form (A from
    registers, shown by ptxas as an R operand), bf16 and f16."""
    from fastmoe_ops.runtime import compiler
    from ptx_cases.build import PTXAS_PROPERTIES, compile_sm90a

    if compiler.nvcc_path() is None:
        pytest.skip("nvcc not installed")
    log, cubin = compile_sm90a(HEADERS + SOURCE, tmp_path)
    props = PTXAS_PROPERTIES.findall(log)
    assert len(props) >= 11 and not [p for p in props if int(p[2]) or int(p[3])], f"spills or no report: {props}"
    if compiler.find_cuobjdump() is None:
        return
    sass = compiler.disassemble(cubin)
    ops = set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Za-z][A-Za-z0-9_.]*)", sass))
    want = [f"HGMMA.64x{n}x16.F32.BF16" for n in SIZES] + ["HGMMA.64x128x16.F32", "WARPGROUP.ARRIVE"]
    missing = [op for op in want if op not in ops]
    assert not missing, f"SASS lacks {missing}: {sorted(o for o in ops if o[:2] in {'HG', 'WA'})}"
    lines = [ln for ln in sass.splitlines() if "HGMMA.64x" in ln and "x16.F32" in ln]
    # RS form: the A operand is a register (R<n>), not a descriptor (gdesc)
    rs = [ln for ln in lines if re.search(r"HGMMA\S*\s+R\d+,\s*R\d+", ln)]
    ss = [ln for ln in lines if re.search(r"HGMMA\S*\s+R\d+,\s*gdesc", ln)]
    assert any(".tnspB" in ln for ln in rs) and any("tnsp" not in ln for ln in rs), "RS with and without imm-trans-b"
    assert any("tnsp" not in ln for ln in ss) and any(".tnspA" in ln for ln in ss), "SS K-major and transposed A"


@pytest.mark.parametrize("kernel", ["wgmma_bf16_ss_n128", "wgmma_bf16_rs_n64_tb", "wgmma_f16_ss_n128"])
def test_simulator_refuses_16bit_wgmma_clearly(kernel):
    """No emulation yet: the call fails naming why, it does not compute a result at issue."""
    from fastmoe_ops.errors import SimError
    from ptx_cases.wgmma_bf16 import exec_case

    runner = SimRunner(SOURCE)
    n = 64 if "n64" in kernel else 128
    case = exec_case(6000, n=n, rs="_rs_" in kernel, trans_b="_tb" in kernel, fmt="f16" if kernel.startswith("wgmma_f16") else "bf16")
    case.kernel = kernel
    with pytest.raises(SimError, match="does not emulate 16-bit wgmma"):
        runner.run(case)


def test_gpu_cases_build_and_name_their_kernels():
    """The GPU test's cases (tests/gpu/test_ptx_wgmma_bf16_gpu.py) exist and each names a kernel of SOURCE."""
    from ptx_cases.wgmma_bf16 import gpu_cases

    cases = gpu_cases(7)
    assert len(cases) >= 20 and all(f"void {c.kernel}(" in SOURCE.replace("NAME(", "") or
                                    f"WG16_ENTRY({c.kernel}," in SOURCE for c in cases)


@pytest.fixture(scope="module")
def exec_runner():
    from ptx_cases.wgmma_bf16 import SIM_EXEC_SOURCE
    return SimRunner(SIM_EXEC_SOURCE)


@pytest.mark.parametrize("sw,b_sw,padded", [("b128", "b128", False), ("b64", "b32", True), ("none", "none", True),
                                            ("none", "b128", False)])
@pytest.mark.parametrize("rs", [False, True])
def test_executor_layouts_and_fragments(exec_runner, sw, b_sw, padded, rs):
    """The emulation's execution half (synchronous here): K-major 16-bit rows through every swizzle
    and padded LBO/SBO, A from shared memory or from the RS register fragment, bit exact against
    the numpy model (one fused step, HMMA's rule) and, on small integers, against float64."""
    from ptx_cases.wgmma_bf16 import exec_case

    for exact in (True, False):
        case = exec_case(1000 + 10 * rs + exact + 3 * padded, sw=sw, b_sw=b_sw, padded=padded, rs=rs, exact=exact)
        case.check(exec_runner.run(case))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_executor_sizes_formats_scale_d(exec_runner, n, fmt):
    from ptx_cases.wgmma_bf16 import exec_case

    case = exec_case(2000 + n, n=n, fmt=fmt, rs=n == 64, scale_d=n != 192)
    case.check(exec_runner.run(case))


def test_executor_wrong_fragment_fails_the_check(exec_runner):
    """The check can fail: A's register fragment built with rows g / g + 8 swapped gives other bits."""
    from ptx_cases.wgmma_bf16 import exec_case

    case = exec_case(3000, rs=True)
    regs = case.args[2].reshape(128, 4).copy()
    case.args[2] = regs[:, [1, 0, 3, 2]].ravel()
    with pytest.raises(AssertionError):
        case.check(exec_runner.run(case))


@pytest.mark.parametrize("sw", ["b128", "b64", "b32", "none"])
@pytest.mark.parametrize("padded", [False, True])
def test_executor_mn_major_b_and_a(exec_runner, sw, padded):
    """trans = 1 (MN-major) through the ISA's canonical layouts: B transposed with A from registers
    (O += P V with V as stored) and with A in shared memory (also transposed), N 64 and 128 (two
    P-byte patterns along N under the 128B swizzle)."""
    from ptx_cases.wgmma_bf16 import exec_case

    for i, (n, rs, ta) in enumerate([(64, True, False), (128, True, False), (128, False, True)]):
        case = exec_case(4000 + 10 * i + padded, n=n, sw=sw, padded=padded, rs=rs, trans_a=ta, trans_b=True,
                         exact=i != 1)
        case.check(exec_runner.run(case))


def test_mn_major_layout_model_is_not_k_major():
    """The two models place elements differently (a wrong trans bit would show)."""
    from ptx_cases.wgmma import kmajor_offset
    from ptx_cases.wgmma_bf16 import mn_offset

    r, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    assert not np.array_equal(mn_offset("b128", 0, 1024, 1024, r, k), kmajor_offset("b128", 0, 16, 1024, r, 2 * k))


def test_executor_wrong_trans_bit_fails_the_check(exec_runner):
    from ptx_cases.wgmma_bf16 import exec_case

    case = exec_case(5000, rs=True, trans_b=True)
    case.args[-1] = np.int32(0)  # B laid out MN-major, read as K-major
    with pytest.raises(AssertionError):
        case.check(exec_runner.run(case))
