"""FP8 GEMM with fine-grained scaling: the kernel on the simulator against the float64
oracle on the dequantised inputs (calc_diff < 1e-5 and an elementwise bound), structured
inputs that must match exactly, ragged shapes, poisoned outputs, memcheck/racecheck, and the
reference GEMM against the same oracle. Both kernels run on the simulator: wgmma (sm_90a,
the default there) and mma.sync (sm_89), chosen with `kernel=`.

Tolerances: tests/fp8_gemm_util.py (assert_close_to_oracle), shared with the GPU tests."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import budget
from fastmoe_ops.ops import fp8_gemm as launcher
from fastmoe_ops.ops import fp8_gemm_config
from fastmoe_ops.reference import fp8 as ref

from conftest import cpu_engines, poison_
from fp8_gemm_util import KERNELS, assert_close_to_oracle, compute_sms, engine_kernels, gemm_oracle, quantised_operands

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def run_gemm(engine, *args, **kw):
    with fmo.use_backend(engine):
        return fmo.fp8.gemm(*args, **kw)


def test_reference_gemm_matches_oracle():
    for m, n, k in [(5, 7, 128), (33, 130, 400)]:
        xq, xs, wq, ws = quantised_operands(m, n, k, 1)
        y = ref.fp8_gemm(xq, xs, wq, ws, torch.float32)
        assert ref.calc_diff(y, ref.fp8_gemm_oracle(xq, xs, wq, ws)) < 1e-10


def test_calc_diff():
    x = torch.randn(10, 10, dtype=torch.float64)
    assert ref.calc_diff(x, x) < 1e-15 and abs(ref.calc_diff(x, -x) - 2) < 1e-12
    assert ref.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0


def tile_of(spec) -> tuple:
    """The fields of a spec that shape its tile (what a wrong fragment or scale index in one
    tile's code path would depend on)."""
    if isinstance(spec, launcher.Fp8GemmWgmmaSpec):
        return (spec.block_m, spec.block_n, spec.stages)
    return (spec.block_m, spec.block_n, spec.warps_m, spec.warps_n, spec.stages)


# Every tile each kernel's heuristic can choose; test_tiles_cover_every_heuristic_choice keeps
# the list complete, so the exact test below cannot silently lose a tile (wgmma's decode tiles:
# NARROW_STRUCTURED).
TILES = {"wgmma": [(128, 128, 7), (128, 112, 7), (128, 96, 8), (128, 64, 8), (64, 128, 8), (64, 112, 8), (64, 96, 8),
                   (64, 64, 8)] + [(bm, bn, 8) for bm in (128, 64) for bn in (56, 48, 40, 32, 24, 16)],
         "mma_sync": [(128, 128, 2, 4, 3), (64, 128, 2, 4, 4), (64, 64, 2, 2, 4)]}
CHOOSE = {"wgmma": launcher.choose_wgmma_spec, "mma_sync": launcher.choose_spec}


def test_tiles_cover_every_heuristic_choice():
    """Sweep the heuristics over modes, b-scale kinds, shapes, group counts and SM budgets
    (and the registered standard specs): they choose exactly the tiles of TILES."""
    for kernel, choose in CHOOSE.items():
        found = {tile_of(s) for s in (launcher.standard_wgmma_specs() if kernel == "wgmma" else launcher.standard_specs())}
        for mode in launcher.MODES:
            for b_scale in launcher.B_SCALES:
                for m in (1, 16, 64, 65, 128, 129, 300, 1024, 4096):
                    for n in (16, 64, 130, 256, 2048, 7168):
                        for groups in ((1, 4, 32) if mode == "masked" else (1,)):
                            for sms in (1, 2, 3, 5, 8, 13, 32, 66, 100, 132):
                                found.add(tile_of(choose(mode, m, n, 2048, "bf16", b_scale, groups=groups, compute_sms=sms)))
        assert found == set(TILES[kernel]), f"{kernel}: the heuristic chooses {sorted(found)}, TILES has {TILES[kernel]}"
    narrow = {t[:2] for t in TILES["wgmma"] if t[1] < 64}
    assert {c[:2] for c in NARROW_STRUCTURED} <= narrow and {bn for _, bn in narrow} == set(fp8_gemm_config.DECODE_BLOCK_N)


def structured_operands(m: int, n: int, k: int, b_scale: str):
    """Small integers (exact in e4m3) with scales distinct per row of a (over any 251 rows)
    and per K block, and per column block of b (per column, period 31, for row-scaled b):
    any wrong fragment, layout or scale index shows as a wrong element, not as noise. Every
    step stays exact under any accumulation order: partial sums are integers far inside the
    tensor core's 13-bit window, scaled sums fit fp32's 24 bits (both asserted)."""
    mi, ki, ni = torch.arange(m)[:, None], torch.arange(k)[None, :], torch.arange(n)[:, None]
    kb = -(-k // 128)
    xq = (((mi * 3 + ki) % 7) - 3).float().to(torch.float8_e4m3fn)
    wq = (((ni + 2 * ki) % 5) - 2).float().to(torch.float8_e4m3fn)
    xs = (1 + (torch.arange(m)[:, None] * 37 + torch.arange(kb)[None, :] * 11) % 251).float() / 64
    rows = -(-n // 128) if b_scale == "blk128" else n
    ws = (1 + (torch.arange(rows)[:, None] * 7 + torch.arange(kb)[None, :] * 3) % 31).float() / 16
    b_rows = launcher.B_SCALES[b_scale]
    oracle = ref.fp8_gemm_oracle(xq, xs, wq, ws, b_scale_rows=b_rows)
    partial = max(float((xq[:, i:i + 128].double() @ wq[:, i:i + 128].double().t()).abs().max()) for i in range(0, k, 128))
    assert partial < 2**10, f"partial sums up to {partial}: not exact in the tensor core's window"
    assert torch.equal(ref.fp8_gemm(xq, xs, wq, ws, torch.float32, b_scale_rows=b_rows).double(), oracle), \
        "the structured products must be exact in fp32"
    return xq, xs, wq, ws, oracle


# The decode tiles (BN 16..56) run one code path whose BN-dependent branches are: weight-scale
# blocks per tile (1 when BN divides 128, else 2), per-row b-scale registers (BN / 32 rounded up:
# 1 or 2), B's 8-row groups (odd or even), BM 64 / 128. These cover each branch (CI time: a module
# per case; tests/test_fp8_gemm_wgmma.py runs 128 x 24 through the launcher and 64 x 16 with row scales).
NARROW_STRUCTURED = {(128, 24, "blk128"), (64, 16, "blk128"), (64, 48, "blk128"), (128, 40, "row"), (128, 16, "row")}


def structured_cases():
    """(kernel, tile, b_scale, out_dtype): every tile of both kernels; mma.sync: both b-scale
    layouts and outputs. wgmma (CI time: each case compiles a module): every tile of BN >= 64
    with weight blocks and fp32 out; per-row b scales on the BM = 128 tiles that take them
    (BN <= 112: fp8_gemm.wgmma_block_ns; the BM = 64 warpgroup runs the same promotion code);
    bf16 out on 128 x 128 (the output conversion is one code path for every tile); the narrow
    tiles as NARROW_STRUCTURED says."""
    for kernel in KERNELS:
        for tile in TILES[kernel]:
            for b_scale in launcher.B_SCALES:
                if kernel == "wgmma" and (tile[1] not in launcher.wgmma_block_ns(b_scale)
                                          or (b_scale == "row" and tile[0] != 128)):
                    continue
                if kernel == "wgmma" and tile[1] < 64 and (*tile[:2], b_scale) not in NARROW_STRUCTURED:
                    continue
                both = kernel == "mma_sync" or tile[:2] == (128, 128)
                for out_dtype in ((torch.float32, torch.bfloat16) if both else (torch.float32,)):
                    yield pytest.param(kernel, tile, b_scale, out_dtype,
                                       id=f"{kernel}-{tile[0]}x{tile[1]}-{b_scale}-{str(out_dtype)[6:]}")


@SIM
@pytest.mark.parametrize("kernel, tile, b_scale, out_dtype", list(structured_cases()))
def test_structured_inputs_exact(kernel, tile, b_scale, out_dtype):
    """Every tile of both kernels, both b-scale layouts: exact, bit for bit. mma.sync: the SM
    budget is chosen so the heuristic picks the tile, and the choice is asserted. wgmma: its
    model rarely picks some tiles at one small shape under any budget, so the tile's spec is
    launched directly on 3 persistent CTAs (5 x 3 to 3 x 5 tiles: each CTA loops)."""
    m, n, k = 150, 260, 272  # ragged in M, N and K for every tile (two full K blocks + 16)
    xq, xs, wq, ws, oracle = structured_operands(m, n, k, b_scale)
    out_name = launcher.OUT_DTYPES[out_dtype]
    out = poison_(torch.empty(m, n, dtype=out_dtype))
    if kernel == "wgmma":
        bm, bn, stages = tile
        spec = launcher.Fp8GemmWgmmaSpec(mode="dense", out=out_name, b_scale=b_scale, block_m=bm, block_n=bn,
                                         stages=stages)
        launcher.run_kernel(spec, grid=(3, 1, 1), a=xq, a_scale=xs, b=wq, b_scale=ws, out=out, m=m, n=n, k=k,
                            engine="sim")
        y = out
    else:
        sms = next((s for s in range(1, budget.SIMULATED_NUM_SMS + 1)
                    if tile_of(CHOOSE[kernel]("dense", m, n, k, out_name, b_scale, compute_sms=s)) == tile), None)
        assert sms is not None, f"no SM budget makes the {kernel} heuristic pick {tile} at {(m, n, k)}"
        with compute_sms(sms):
            spec, _ = launcher.select("dense", kernel, m, n, k, out_name, b_scale)
            assert tile_of(spec) == tile, f"the launch would run {spec}, not tile {tile}"
            y = run_gemm("sim", xq, xs, wq, ws, out_dtype, out=out, kernel=kernel)
    assert y.data_ptr() == out.data_ptr()
    want = oracle.to(out_dtype)
    bad = y != want
    assert not bool(bad.any()), (f"{kernel} {tile} {b_scale}: {int(bad.sum())} wrong; first at {tuple(bad.nonzero()[0].tolist())}: "
                                 f"got {y[bad][0].item()}, want {want[bad][0].item()}")


@pytest.mark.parametrize("engine, kernel", engine_kernels())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 16), (64, 64, 128), (100, 72, 272), (129, 200, 400), (16, 300, 144), (40, 72, 1040)])
def test_gemm_vs_oracle(engine, kernel, out_dtype, shape):
    m, n, k = shape
    seed = m * 131 + n * 7 + k
    xq, xs, wq, ws = quantised_operands(m, n, k, seed)
    out = poison_(torch.empty(m, n, dtype=out_dtype))
    y = run_gemm(engine, xq, xs, wq, ws, out_dtype, out=out, kernel=kernel)
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws, kernel=kernel), f"gemm {engine} {kernel} {out_dtype}", seed)


@pytest.mark.parametrize("engine, kernel", engine_kernels())
def test_gemm_row_scaled_b(engine, kernel):
    """b scaled per 1 x 128 group (ws [N, kb]): the wgrad layout."""
    m, n, k = 40, 136, 160
    xq, xs, wq, ws = quantised_operands(m, n, k, 8, b_rows=True)
    assert ws.shape == (n, 2)
    y = run_gemm(engine, xq, xs, wq, ws, torch.float32, kernel=kernel)
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws, b_scale_rows=1, kernel=kernel), f"row-scaled b ({engine})", 8)


@SIM
def test_gemm_large_tile_config():
    """Force the 128 x 128 (8-warp) tile with a tiny SM budget, on a ragged shape with more
    K blocks (5) than pipeline stages (3), so the stage ring wraps."""
    m, n, k = 150, 130, 592
    xq, xs, wq, ws = quantised_operands(m, n, k, 3)
    spec = launcher.choose_spec("dense", m, n, k, "fp32", "blk128", compute_sms=1)
    assert (spec.block_m, spec.block_n) == (128, 128)
    out = poison_(torch.empty(m, n))
    launcher.run_kernel(spec, grid=(2, 2), a=xq, a_scale=xs, b=wq, b_scale=ws, out=out, m=m, n=n, k=k, engine="sim")
    assert_close_to_oracle(out, gemm_oracle(xq, xs, wq, ws), "128x128 tile", 3)


@SIM
@pytest.mark.parametrize("kernel", KERNELS)
def test_gemm_under_memcheck_and_racecheck(monkeypatch, kernel):
    m, n, k = 33, 72, 176
    xq, xs, wq, ws = quantised_operands(m, n, k, 5)
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    y = run_gemm("sim", xq, xs, wq, ws, torch.bfloat16, kernel=kernel)
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws, kernel=kernel), "checked build", 5)


def test_heuristic_is_pure_and_budget_aware():
    a = launcher.choose_spec("dense", 4096, 7168, 2048, "bf16", "blk128", compute_sms=132)
    assert a == launcher.choose_spec("dense", 4096, 7168, 2048, "bf16", "blk128", compute_sms=132)
    assert (a.block_m, a.block_n) == (128, 128)
    small = launcher.choose_spec("dense", 128, 2048, 7168, "bf16", "blk128", compute_sms=132)
    assert (small.block_m, small.block_n) == (64, 64), "few tiles: the smaller tile fills more SMs"
    assert launcher.choose_spec("dense", 16, 4096, 7168, "bf16", "blk128", compute_sms=16).block_m == 64
    for spec in launcher.standard_specs():
        spec.check()


def test_empty_and_zero_k():
    for engine in cpu_engines():
        xq = torch.zeros(0, 32).to(torch.float8_e4m3fn)
        y = run_gemm(engine, xq, torch.ones(0, 1), torch.zeros(8, 32).to(torch.float8_e4m3fn), torch.ones(1, 1))
        assert y.shape == (0, 8)
        y = run_gemm(engine, torch.zeros(4, 0).to(torch.float8_e4m3fn), torch.ones(4, 0),
                     torch.zeros(8, 0).to(torch.float8_e4m3fn), torch.ones(1, 0))
        assert y.shape == (4, 8) and torch.all(y == 0)


def _bad_cases():
    xq, xs, wq, ws = quantised_operands(8, 16, 128, 0)
    yield "xq", "float8_e4m3fn", (xq.float(), xs, wq, ws), {}
    yield "xs", "shape", (xq, xs[:, :0], wq, ws), {}
    yield "ws", "shape", (xq, xs, wq, torch.ones(3, 1)), {}
    yield "xs", "float32", (xq, xs.double(), wq, ws), {}
    yield "wq", "contiguous", (xq, xs, torch.cat([wq, wq], 1)[:, ::2], ws), {}
    xq2, xs2, wq2, ws2 = quantised_operands(8, 16, 40, 0)
    yield "K", "multiple of 16", (xq2, xs2, wq2, ws2), {}
    yield "out_dtype", "bfloat16", (xq, xs, wq, ws), {"out_dtype": torch.float16}
    yield "out", "shape", (xq, xs, wq, ws), {"out": torch.empty(8, 15, dtype=torch.bfloat16)}


@pytest.mark.parametrize("case", list(range(8)))
def test_bad_input_refused(case):
    arg, fragment, args, kw = list(_bad_cases())[case]
    with pytest.raises(fmo.InputError, match=rf"^{arg}: expected .*{fragment}"):
        fmo.fp8.gemm(*args, **kw)


def test_custom_op_traces_under_torch_compile():
    """torch.ops.fmo.fp8_gemm: opcheck's fake-tensor check, and a fullgraph compile."""
    xq, xs, wq, ws = quantised_operands(16, 32, 160, 4)
    with fmo.use_backend("reference"):
        torch.library.opcheck(torch.ops.fmo.fp8_gemm, (xq, xs, wq, ws, torch.float32),
                              test_utils=("test_faketensor",))  # test_schema does arithmetic e4m3 lacks on CPU
        fn = torch.compile(lambda *a: torch.ops.fmo.fp8_gemm(*a, torch.float32) * 2, backend="eager", fullgraph=True)
        y = fn(xq, xs, wq, ws)
    assert_close_to_oracle(y / 2, gemm_oracle(xq, xs, wq, ws), "custom op", 4)
