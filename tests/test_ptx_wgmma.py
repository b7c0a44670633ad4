"""ptx/wgmma.cuh: wgmma.mma_async m64n128k32 e4m3 x e4m3 -> f32 with shared-memory matrix
descriptors, on the simulator against numpy models of the PTX ISA.

The shared-memory image is laid out here by an independent numpy model of the ISA's K-major
layouts ("Shared Memory Matrix Layout": no swizzle with LBO/SBO core matrices, and the
32/64/128-byte swizzles), with padded strides and start addresses advanced inside a swizzle
row (the GEMM's k-steps), so a descriptor field or swizzle decoded wrongly moves values and
fails. Results are compared bit for bit with the hardware's arithmetic as modelled in numpy
(fastmoe_ops/reference/tensor_core.py: per instruction one fused step, terms truncated 13 bits
below the largest, result to 13 fraction bits; tests/test_mma_capture_replay.py holds the
emulation to the H200's own outputs) and, on inputs for which that rule is exact, with float64
A @ B + C. The asynchronous semantics are tested too: D read before wait_group is the old D,
shared memory overwritten before wait_group is what gets multiplied, and an MMA without a
fence or with descriptors differing between the warpgroup's warps fails.

The kernels, models and case builders: tests/ptx_cases/wgmma.py (shared with the GPU
conformance test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ptx_cases.case import Case, assert_equal_bits, poisoned
from ptx_cases.runners import HEADERS, SimRunner
from ptx_cases.wgmma import KERNEL_OF_N, M, N, SOURCE, SWIZZLE, kmajor_offset, rule_probe_cases, wgmma_case


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


def test_layout_model_b128_is_the_gemm_swizzle():
    """The 128-byte swizzle of one 1024-byte-aligned [8k rows, 128] tile is the layout the
    GEMM's cp.async writes (csrc/gemm/fp8_gemm_mainloop.cuh: swizzle(row, chunk) =
    row * 128 + (chunk ^ row % 8) * 16), with SBO = 1024 and k-step s at start + 32 s."""
    rows = np.arange(64)[:, None]
    k = np.arange(128)[None, :]
    model = kmajor_offset("b128", 0, 0, 1024, rows, k)
    gemm = rows * 128 + (((k // 16) ^ (rows % 8)) * 16) + k % 16
    assert np.array_equal(model, gemm)
    for s in range(4):  # the start advanced inside the row addresses the same bytes
        assert np.array_equal(kmajor_offset("b128", 32 * s, 0, 1024, rows, np.arange(32)[None, :]),
                              gemm[:, 32 * s:32 * (s + 1)])


@pytest.mark.parametrize("sw", list(SWIZZLE))
@pytest.mark.parametrize("padded", [False, True])
def test_wgmma_layouts_bit_exact(runner, sw, padded):
    case = wgmma_case(sw, 100 + SWIZZLE[sw] + 7 * padded, ksteps=4 if sw != "none" else 2, padded=padded)
    case.check(runner.run(case))


@pytest.mark.parametrize("n", [96, 192, 256])
@pytest.mark.parametrize("exact", [True, False])
def test_wgmma_template_sizes_bit_exact(runner, n, exact):
    """wgmma_m64nNk32_e4m3<N> for N other than 64/128: the model's bits (and float64's on
    rule-exact inputs); B's rows past 128 land in accumulator registers 64.. of the fragment."""
    case = wgmma_case("b128", 300 + n + exact, ksteps=2, exact=exact, n=n)
    case.check(runner.run(case))


@pytest.mark.parametrize("n,sw,padded,exact", [
    (16, "b128", False, False), (24, "b128", True, True), (40, "none", True, True), (56, "b64", False, False),
    (24, "b32", False, False)])
def test_wgmma_decode_sizes_bit_exact(runner, n, sw, padded, exact):
    """The GEMM's decode tiles' N (16..56; 24, 40, 56 are an odd number of 8-row groups of B):
    4 k-steps (2 unswizzled) issued between one fence and one commit, retired by wait_group 0,
    bit for bit the model's (and float64's on rule-exact inputs), swizzled and padded layouts."""
    case = wgmma_case(sw, 1100 + n + 7 * padded + SWIZZLE[sw], ksteps=4 if sw != "none" else 2, padded=padded,
                      exact=exact, n=n)
    case.check(runner.run(case))


def test_wgmma_decode_size_d_before_wait_is_the_old_d(runner):
    """The asynchronous path at N = 24: D stored between commit and wait is the old D."""
    case = wgmma_case("b128", 1200, ksteps=2, n=24)
    case.args[14] = np.int32(1)
    (d,) = runner.run(case)
    assert_equal_bits(d, case.extra["c"], "m64n24k32: D read before wgmma.wait_group")


@pytest.mark.parametrize("sw", list(SWIZZLE))
@pytest.mark.parametrize("padded", [False, True])
def test_wgmma_n64_layouts_bit_exact(runner, sw, padded):
    case = wgmma_case(sw, 150 + SWIZZLE[sw] + 7 * padded, ksteps=4 if sw != "none" else 2, padded=padded, n=64)
    case.check(runner.run(case))


@pytest.mark.parametrize("n", [128, 64])
@pytest.mark.parametrize("sw", list(SWIZZLE))
def test_wgmma_random_codes_scale_d0(runner, sw, n):
    case = wgmma_case(sw, 200 + SWIZZLE[sw] + n, ksteps=1, exact=False, accumulate_c=False, n=n)
    outs = runner.run(case)
    case.check(outs)
    assert_equal_bits(outs[0], case.extra["want_bits"], case.name + " (the hardware's rule)")


def test_wgmma_random_codes_onto_random_c(runner):
    """A full-precision fp32 accumulator under random products: the emulation cuts C to the
    window like any term, as the numpy model does (the GPU conformance run decides the rule)."""
    case = wgmma_case("b128", 250, ksteps=2, exact=False)
    case.check(runner.run(case))


@pytest.mark.parametrize("index", range(5))
def test_wgmma_rule_probes(runner, index):
    case = rule_probe_cases(60)[index]
    case.check(runner.run(case))


def test_wgmma_mixed_layouts(runner):
    case = wgmma_case("b128", 300, ksteps=2, b_sw="none")
    case.check(runner.run(case))


def test_wgmma_wrong_descriptor_fails_the_check(runner):
    """Guard on the test itself: a descriptor with the wrong SBO gives a wrong result."""
    case = wgmma_case("b128", 400, ksteps=1, padded=True)
    case.args[8] = np.int32(1024)  # a_sbo: the dense value instead of the padded 2048
    with pytest.raises(AssertionError):
        case.check(runner.run(case))


def test_wgmma_d_before_wait_is_the_old_d(runner):
    case = wgmma_case("b128", 500, ksteps=2)
    case.args[14] = np.int32(1)  # mode 1: D stored between commit and wait
    (d,) = runner.run(case)
    assert_equal_bits(d, case.extra["c"], "D read before wgmma.wait_group")


def test_wgmma_smem_overwritten_before_wait_is_what_multiplies(runner):
    """Zeroing A's bytes after the issue and before the wait: the MMA (executed at the wait,
    as the hardware may) sees zeros, D = C."""
    case = wgmma_case("b128", 600, ksteps=1)
    a_bytes = 8 * case.extra["a_sbo"]
    case.args[14:18] = [np.int32(2), np.int32(0), np.int32(a_bytes), np.zeros(a_bytes, np.uint8)]
    (d,) = runner.run(case)
    assert_equal_bits(d, case.extra["c"], "A overwritten before wgmma.wait_group")


def test_wgmma_without_fence_fails(runner):
    from fastmoe_ops.errors import SimError

    case = wgmma_case("b128", 700, ksteps=1)
    case.args[14] = np.int32(3)
    with pytest.raises(SimError, match="wgmma.fence"):
        runner.run(case)


def test_wgmma_descriptors_differing_across_warps_fail(runner):
    from fastmoe_ops.errors import SimError

    case = wgmma_case("b128", 800, ksteps=2)
    case.args[14] = np.int32(4)
    with pytest.raises(SimError, match="warp 3 of the warpgroup"):
        runner.run(case)


def test_wgmma_kernel_compiles_for_sm90a_with_qgmma(tmp_path):
    """The GPU side offline (nvcc, no GPU): the test kernel builds for sm_90a without spills and
    its SASS has QGMMA (wgmma e4m3) at every N the cases launch (16 .. 256), the warpgroup arrive/depbar of fence and wait, and the
    async-proxy fence (the checks of tests/test_ptx_build.py, for this family)."""
    import re

    from fastmoe_ops.runtime import compiler
    from ptx_cases.build import PTXAS_PROPERTIES, compile_sm90a

    if compiler.nvcc_path() is None:
        pytest.skip("nvcc not installed")
    log, cubin = compile_sm90a(HEADERS + SOURCE, tmp_path)
    props = PTXAS_PROPERTIES.findall(log)
    assert props and not [p for p in props if int(p[2]) or int(p[3])], f"spills or no ptxas report: {props}"
    if compiler.find_cuobjdump() is None:
        return
    sass = compiler.disassemble(cubin)
    ops = set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Za-z][A-Za-z0-9_.]*)", sass))
    want = [f"QGMMA.64x{n}x32.F32.E4M3.E4M3" for n in sorted(KERNEL_OF_N)] + [
        "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR.LE", "FENCE.VIEW.ASYNC.S"]
    missing = [op for op in want if op not in ops]
    assert not missing, f"SASS lacks {missing}: {sorted(o for o in ops if o[:2] in {'QG', 'HG', 'WA', 'FE'})}"


def test_wgmma_wait_group_n_retires_all_but_the_newest_n(runner):
    """Simulator-defined (reading D2 before its wait is undefined on the GPU)."""
    case = wgmma_case("b128", 900, ksteps=1)
    image, c = case.args[0], case.extra["c"]
    a_off, b_off = int(case.args[4][0]), int(case.args[5][0])
    args = [image, np.int32(image.size), c, poisoned((3, M, N), np.float32), np.int32(a_off), np.int32(b_off),
            np.int32(case.extra["a_sbo"])]
    (d,) = runner.run(Case(name="two groups", kernel="wgmma_two_groups", grid=(1,), block=(128,), args=args,
                           outputs=[3], check=None, shared_mem=image.size))
    assert_equal_bits(d[0], case.extra["want_bits"], "group 1 after wait_group 1")
    assert_equal_bits(d[1], c, "group 2 after wait_group 1 (still pending: the old D)")
    assert_equal_bits(d[2], case.extra["want_bits"], "group 2 after wait_group 0")


def test_wgmma_wait_group_retires_groups_strictly_in_order(runner):
    """Three groups: wait_group 2 retires only the oldest, wait_group 1 the second, wait_group 0
    the newest (simulator-defined reads of pending accumulators: the old D)."""
    case = wgmma_case("b128", 901, ksteps=1, n=64)
    image, c = case.args[0], case.extra["c"]
    a_off, b_off = int(case.args[4][0]), int(case.args[5][0])
    args = [image, np.int32(image.size), c, poisoned((6, M, 64), np.float32), np.int32(a_off), np.int32(b_off),
            np.int32(case.extra["a_sbo"])]
    (d,) = runner.run(Case(name="three groups", kernel="wgmma_three_groups", grid=(1,), block=(128,), args=args,
                           outputs=[3], check=None, shared_mem=image.size))
    done, old = case.extra["want_bits"], c
    for k, (want, what) in enumerate([(done, "group 1 after wait 2"), (old, "group 2 after wait 2 (pending)"),
                                      (old, "group 3 after wait 2 (pending)"), (done, "group 2 after wait 1"),
                                      (old, "group 3 after wait 1 (pending)"), (done, "group 3 after wait 0")]):
        assert_equal_bits(d[k], want, what)


def test_wgmma_operand_past_the_launch_shared_memory_fails_under_memcheck(runner, monkeypatch):
    """A descriptor whose stride walks B past the launch's dynamic shared memory: memcheck
    names the out-of-bounds shared read (the emulation reports every operand read)."""
    from fastmoe_ops.errors import SimError

    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    case = wgmma_case("b128", 1000, ksteps=1)
    case.args[11] = np.int32(4096)  # b_sbo: 16 groups of 8 rows at 4 KiB strides = 64 KiB > the image
    with pytest.raises(SimError, match="out-of-bounds dynamic shared memory read"):
        runner.run(case)


def test_generated_asm_header_is_current():
    """ptx/wgmma_e4m3_asm.cuh is exactly what ptx/gen_wgmma_e4m3.py writes (edit the script, not it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "ptx" / "gen_wgmma_e4m3.py"
    spec = importlib.util.spec_from_file_location("gen_wgmma_e4m3", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text() == gen.text(), "run python ptx/gen_wgmma_e4m3.py"
