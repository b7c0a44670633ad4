"""ptx/wgmma_bf16.cuh: wgmma.mma_async m64nNk16 with bf16/f16 inputs, SS and RS forms.

What is checked: the generated asm header is what ptx/gen_wgmma_bf16.py writes; the test kernels
build for sm_90a without spills and their SASS has HGMMA for every N and form (SS and RS, bf16 and
f16). On the simulator, the wrappers' emulation (queued like the e4m3 family's, executed at the
wait_group that retires the op) runs the GPU test's cases (SS and RS, N 64..256, K-major and
MN-major operands in every swizzle, bf16 and f16, scale-d) through fence / commit_group /
wait_group, bit exact against the numpy model (tensor_core.dot_add, HMMA's rule, assumed for
HGMMA) and, on small integers, float64. The asynchronous semantics: groups retire strictly in
order with three in flight, D read before its wait is the old D (so a kernel doing that fails its
check), A's shared memory overwritten before the wait is what gets multiplied, an MMA without a
fence fails. The executor alone (sim_detail::wgmma16_execute called synchronously) is also checked
on its layouts (every swizzle, padded LBO/SBO, MN-major). The emulation's layout readers and this
file's numpy layout models are written from the same ISA tables: a misreading shared by both shows
only in the GPU run (tests/gpu/test_ptx_wgmma_bf16_gpu.py, same cases, same model).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ptx_cases.case import assert_equal_bits, poisoned
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


@pytest.fixture(scope="module")
def wrapper_runner():
    from ptx_cases.wgmma_bf16 import ASYNC_SOURCE
    return SimRunner(SOURCE + ASYNC_SOURCE)


GPU_SEED = 4321  # the GPU test's seed: the simulator runs the very cases the device will


@pytest.mark.parametrize("index", range(29))
def test_wrappers_async_bit_exact(wrapper_runner, index):
    """The GPU test's cases through the real wrappers (fence, mma_async, commit_group, wait_group):
    the queued op runs at the wait, bit exact vs the numpy model (and float64 on exact cases)."""
    from ptx_cases.wgmma_bf16 import gpu_cases

    cases = gpu_cases(GPU_SEED)
    assert len(cases) == 29
    case = cases[index]
    case.check(wrapper_runner.run(case))


def async_case(mode: int, seed: int, rs: bool):
    from ptx_cases.wgmma_bf16 import exec_case

    case = exec_case(seed, n=64, rs=rs, trans_b=rs, exact=True)
    case.kernel = "wgmma16_async"
    case.args[4] = poisoned({0: (6, 64, 64), 1: (2, 64, 64)}.get(mode, (1, 64, 64)), np.float32)
    case.args.append(np.int32(mode))
    return case


def test_wrappers_retire_groups_strictly_in_order(wrapper_runner):
    """Three RS groups in flight: wait_group 2 retires only the oldest, wait_group 1 the second,
    wait_group 0 the newest (reads of pending accumulators are the old D: simulator-defined)."""
    case = async_case(0, 6100, rs=True)
    (d,) = wrapper_runner.run(case)
    done = d[5]
    case.check([done])  # the last one retired is the model's A B + C
    c = case.args[3]
    for k, (want, what) in enumerate([(done, "group 1 after wait 2"), (c, "group 2 after wait 2 (pending)"),
                                      (c, "group 3 after wait 2 (pending)"), (done, "group 2 after wait 1"),
                                      (c, "group 3 after wait 1 (pending)")]):
        assert_equal_bits(d[k], want, what)


def test_wrappers_d_read_before_wait_is_the_old_d(wrapper_runner):
    """A kernel that stores D after commit_group and before wait_group stores C (it would fail any
    check against A B + C); after the wait D is A B + C."""
    case = async_case(1, 6200, rs=False)
    (d,) = wrapper_runner.run(case)
    assert_equal_bits(d[0], case.args[3], "D read before wgmma.wait_group")
    with pytest.raises(AssertionError):
        case.check([d[0]])
    case.check([d[1]])


def test_wrappers_smem_overwritten_before_wait_is_what_multiplies(wrapper_runner):
    """A's bytes zeroed between the issue and the wait: the MMA (run at the wait) multiplies the
    zeros, so D = C exactly (0 * B + C, one rounding of C's own 24 bits)."""
    case = async_case(2, 6300, rs=False)
    (d,) = wrapper_runner.run(case)
    assert_equal_bits(d[0], case.args[3], "A overwritten before wgmma.wait_group")


def test_wrappers_rs_registers_captured_at_issue(wrapper_runner):
    """RS: the A fragment is gathered when the warp issues (simulator-defined: on the GPU changing
    the registers before the wait is undefined); the op still multiplies the issued A."""
    case = async_case(4, 6400, rs=True)
    (d,) = wrapper_runner.run(case)
    case.check([d[0]])


def test_wrappers_without_fence_fail(wrapper_runner):
    from fastmoe_ops.errors import SimError

    with pytest.raises(SimError, match="without a wgmma.fence"):
        wrapper_runner.run(async_case(3, 6500, rs=False))


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
