"""The Hopper FP8 GEMM (warp-specialised: TMA producer warp, wgmma math warpgroups, mbarrier
ring, persistent tile scheduler; csrc/gemm/fp8_gemm_wgmma.cuh) on the simulator: the launcher's
kernel choice, the pure (shape, SM budget) heuristic and grid, and runs whose SM budget is
shrunk so that each CTA loops over several tiles (dense, grouped contiguous with empty groups
and padding rows, masked with masked_m = 0 and partial tiles), each wgmma N the model may pick
(tiles across two weight-scale blocks, a 2-stage ring, K under one block), under
memcheck/racecheck too, against the float64 oracle; a deliberately broken pipeline (a stage
released before its MMAs retired) must fail; the plan's TMA maps and their refusals.
Tolerances as tests/test_fp8_gemm.py (same operands and promotion)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import budget
from fastmoe_ops.ops import fp8_gemm as launcher
from fastmoe_ops.reference import fp8 as ref

from conftest import poison_
from fp8_gemm_util import assert_close_to_oracle, compute_sms, gemm_oracle, contiguous_layout, contiguous_oracle, expert_weights, quantised_operands

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")


def test_kernel_choice_by_device():
    assert launcher.kernel_for("sim", torch.device("cpu")) == "wgmma"
    spec, grid = launcher.select("dense", "wgmma", 300, 500, 256, "bf16", "blk128")
    assert isinstance(spec, launcher.Fp8GemmWgmmaSpec) and len(grid) == 3
    spec, grid = launcher.select("dense", "mma_sync", 300, 500, 256, "bf16", "blk128")
    assert isinstance(spec, launcher.Fp8GemmSpec)
    xq, xs, wq, ws = quantised_operands(8, 16, 128, 0)
    with fmo.use_backend("sim"), pytest.raises(fmo.InputError, match="^kernel: expected one of"):
        fmo.fp8.gemm(xq, xs, wq, ws, kernel="qmma")


def test_heuristic_and_grid_are_pure_functions_of_shape_and_budget():
    for sms in (1, 7, 112, 132):
        for m, n, groups in [(4096, 7168, 1), (16, 4096, 1), (300, 130, 1), (64, 7168, 32)]:
            a = launcher.choose_wgmma_spec("dense", m, n, 2048, "bf16", "blk128", groups=groups, compute_sms=sms)
            assert a == launcher.choose_wgmma_spec("dense", m, n, 2048, "bf16", "blk128", groups=groups, compute_sms=sms)
            grid = launcher.persistent_grid(a, m, n, groups=groups, compute_sms=sms)
            tiles = groups * -(-m // a.block_m) * -(-n // a.block_n)
            assert grid == (min(tiles, sms), 1, 1), (m, n, groups, sms, a)
    assert launcher.choose_wgmma_spec("dense", 4096, 7168, 2048, "bf16", "blk128", compute_sms=132).block_m == 128
    assert launcher.choose_wgmma_spec("dense", 64, 7168, 2048, "bf16", "blk128", compute_sms=1).block_m == 64
    few = launcher.choose_wgmma_spec("dense", 256, 1024, 7168, "bf16", "blk128", compute_sms=132)
    assert (few.block_m, few.block_n) == (64, 32), "64 tiles of 64 x 64 would leave half the SMs idle; 128 of 64 x 32 do not"
    mid = launcher.choose_wgmma_spec("dense", 1024, 2048, 7168, "bf16", "blk128", compute_sms=132)
    assert (mid.block_m, mid.block_n) == (128, 128), "one wave of 128 tiles beats two waves of 64 x 128"
    mid = launcher.choose_wgmma_spec("dense", 512, 2048, 7168, "bf16", "blk128", compute_sms=132)
    assert (mid.block_m, mid.block_n) == (64, 128), "64 tiles of 128 x 128 leave half the SMs idle; 128 of 64 x 128 do not"
    for spec in launcher.standard_wgmma_specs():
        spec.check()
    # contiguous: m is every group's rows already, so groups must not multiply the tile count
    for kernel, choose in (("wgmma", launcher.choose_wgmma_spec), ("mma_sync", launcher.choose_spec)):
        with compute_sms(100):
            spec, _ = launcher.select("contiguous", kernel, 512, 2048, 7168, "bf16", "blk128", groups=8)
            assert spec == choose("contiguous", 512, 2048, 7168, "bf16", "blk128", compute_sms=100), kernel
    with budget.comm_sms(20), budget.communication_in_flight():  # the budget is read when not given
        spec = launcher.choose_wgmma_spec("dense", 4096, 7168, 2048, "bf16", "blk128")
        assert launcher.persistent_grid(spec, 4096, 7168) == (112, 1, 1)


@SIM
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dense_persistent_loop(out_dtype):
    """2 CTAs for 6 tiles of 128 x 128 (ragged M, N, K; 6 K blocks around a 4-stage ring)."""
    m, n, k = 150, 260, 720
    xq, xs, wq, ws = quantised_operands(m, n, k, 11)
    with compute_sms(2):
        spec, grid = launcher.select("dense", "wgmma", m, n, k, "fp32", "blk128")
        assert (spec.block_m, grid) == (128, (2, 1, 1))
        out = poison_(torch.empty(m, n, dtype=out_dtype))
        with fmo.use_backend("sim"):
            y = fmo.fp8.gemm(xq, xs, wq, ws, out_dtype, out=out, kernel="wgmma")
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws), f"wgmma persistent {out_dtype}", 11)


@SIM
def test_dense_raster_bands_cover_every_tile():
    """9 m-tiles: a full band of 8 and a last band of 1 (scheduler raster), 3 CTAs; every
    output element is poisoned first, so a tile visited twice or never shows."""
    m, n, k = 1100, 200, 144
    xq, xs, wq, ws = quantised_operands(m, n, k, 15)
    with compute_sms(3):
        spec, grid = launcher.select("dense", "wgmma", m, n, k, "fp32", "blk128")
        assert (spec.block_m, grid) == (128, (3, 1, 1))
        out = poison_(torch.empty(m, n))
        with fmo.use_backend("sim"):
            y = fmo.fp8.gemm(xq, xs, wq, ws, torch.float32, out=out, kernel="wgmma")
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws), "wgmma raster bands", 15)


def _run_spec(spec, m, n, k, seed, *, ctas, b_rows=False):
    """One launch of `spec` on the simulator with `ctas` persistent CTAs, output poisoned."""
    xq, xs, wq, ws = quantised_operands(m, n, k, seed, b_rows=b_rows)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16 if spec.out == "bf16" else torch.float32))
    launcher.run_kernel(spec, grid=(ctas, 1, 1), a=xq, a_scale=xs, b=wq, b_scale=ws, out=out, m=m, n=n, k=k,
                        engine="sim")
    return out, gemm_oracle(xq, xs, wq, ws, b_scale_rows=1 if b_rows else 128)


@SIM
@pytest.mark.parametrize("bm,bn,stages,b_rows,shape", [
    (128, 96, 2, False, (150, 200, 912)),   # tiles straddle two 128 x 128 b-scale blocks; a 2-stage ring
    (64, 112, 8, False, (70, 230, 48)),     # K shorter than one block (the maps' zero fill)
    (64, 16, 3, True, (40, 70, 288)),       # decode tile, per-row b scales (lanes 0..15 hold them), last tile 6 columns
])
def test_tile_shapes(bm, bn, stages, b_rows, shape):
    """Random operands on tiles the cost model may pick (wgmma N 96 / 112 / 16; every tile runs
    exact structured inputs in tests/test_fp8_gemm.py), launched directly: ragged M, N, K,
    fewer CTAs than tiles (the ring's phases wrap across tiles), against the float64 oracle."""
    m, n, k = shape
    spec = launcher.Fp8GemmWgmmaSpec(mode="dense", out="fp32", b_scale="row" if b_rows else "blk128",
                                     block_m=bm, block_n=bn, stages=stages)
    y, oracle = _run_spec(spec, m, n, k, 16, ctas=3, b_rows=b_rows)
    assert_close_to_oracle(y, oracle, f"wgmma {bm}x{bn} s{stages} b_rows={b_rows}", 16)


@SIM
def test_decode_tile_chosen_and_run():
    """Decode-sized M on a budget of 12 SMs: the launcher picks a narrow tile (128 x 24: 9 tiles in
    one wave, where BN >= 64 gives 4), ragged N (200 = 8 x 24 + 8: the last tile has 8 columns; the
    tile at column 120 straddles two weight-scale blocks), ragged M and K; then the same spec on 2
    persistent CTAs (the 8-stage ring's phases wrap across a CTA's tiles)."""
    m, n, k = 100, 200, 400
    xq, xs, wq, ws = quantised_operands(m, n, k, 25)
    oracle = gemm_oracle(xq, xs, wq, ws)
    with compute_sms(12):
        spec, grid = launcher.select("dense", "wgmma", m, n, k, "fp32", "blk128")
        assert (spec.block_m, spec.block_n, grid) == (128, 24, (9, 1, 1)), (spec, grid)
        out = poison_(torch.empty(m, n))
        with fmo.use_backend("sim"):
            y = fmo.fp8.gemm(xq, xs, wq, ws, torch.float32, out=out, kernel="wgmma")
    assert_close_to_oracle(y, oracle, "wgmma decode 128x24 (launcher)", 25)
    y, _ = _run_spec(spec, m, n, k, 25, ctas=2)
    assert_close_to_oracle(y, oracle, "wgmma decode 128x24 on 2 CTAs", 25)


@SIM
def test_releasing_a_stage_before_its_mmas_retire_fails():
    """The pipeline bug the design must not have, built in on purpose (unsafe_early_release:
    empty[s] arrives right after the MMAs reading s are committed, not after they retired): the
    producer refills the stage under the pending MMAs and the simulator's TMA poison (0xFF, an
    e4m3 NaN) reaches them, or a barrier check fails. Either way the run cannot pass."""
    spec = launcher.Fp8GemmWgmmaSpec(mode="dense", out="fp32", b_scale="blk128", block_m=64, block_n=64, stages=2,
                                     unsafe_early_release=True)
    try:
        y, oracle = _run_spec(spec, 64, 64, 768, 17, ctas=1)
    except Exception as e:  # a barrier misuse report is as good as wrong numbers
        assert "mbarrier" in str(e) or "phase" in str(e), str(e)
        return
    with pytest.raises(AssertionError):
        assert_close_to_oracle(y, oracle, "early release", 17)
    # the same spec without the bug passes (so the failure above is the bug's)
    good = dataclasses.replace(spec, unsafe_early_release=False)
    y, oracle = _run_spec(good, 64, 64, 768, 17, ctas=1)
    assert_close_to_oracle(y, oracle, "release after retire", 17)


@SIM
def test_contiguous_persistent_with_empty_groups():
    counts, n, k = [100, 0, 28, 130], 136, 272
    wq3, ws3 = expert_weights(len(counts), n, k, 12)
    xq, xs, m_indices = contiguous_layout(counts, k, 12)
    out = poison_(torch.empty(xq.shape[0], n))
    with compute_sms(3), fmo.use_backend("sim"):
        y = fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, torch.float32, out=out, debug=True,
                                            kernel="wgmma")
    assert torch.all(y[m_indices < 0] == 0), "padding rows (-1) must be zero"
    assert_close_to_oracle(y, contiguous_oracle(xq, xs, wq3, ws3, m_indices), "wgmma contiguous persistent", 12)


@SIM
@pytest.mark.parametrize("checked", [False, True])
def test_masked_persistent(monkeypatch, checked):
    """masked_m = 0, a full and a partial group; 2 CTAs walk all 3 groups' tiles (the empty
    ones are skipped without a memory access); rows >= masked_m stay unwritten."""
    groups, mmax, n, k = 3, 130, 136, 400
    masked = [0, 130, 65]
    if checked:
        monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
        monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    wq3, ws3 = expert_weights(groups, n, k, 13)
    x = torch.randn(groups, mmax, k, generator=torch.Generator().manual_seed(13))
    q = [ref.quantize_per_token_group(x[i]) for i in range(groups)]
    xq3, xs3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16))
    with compute_sms(2), fmo.use_backend("sim"):
        y = fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, torch.tensor(masked, dtype=torch.int32), torch.bfloat16,
                                        out=out, kernel="wgmma")
    for g, r in enumerate(masked):
        if r:
            assert_close_to_oracle(y[g, :r], gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g]),
                                   f"wgmma masked group {g}", 13)
        assert torch.isnan(y[g, r:].float()).all(), f"group {g}: rows >= masked_m must not be written"


@SIM
def test_dense_row_scaled_b_persistent_under_checks(monkeypatch):
    """1 x 128 b scales (per column in the promotion), one warpgroup, 1 CTA over 2 tiles, memcheck and
    racecheck on (the wgmma emulation reports its shared-memory reads at the wait)."""
    m, n, k = 40, 200, 160
    xq, xs, wq, ws = quantised_operands(m, n, k, 14, b_rows=True)
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    with compute_sms(1), fmo.use_backend("sim"):
        y = fmo.fp8.gemm(xq, xs, wq, ws, torch.float32, kernel="wgmma")
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws, b_scale_rows=1), "wgmma row-scaled b", 14)


@SIM
def test_tensor_maps_cached_per_plan_and_misaligned_operands_refused():
    """A plan keeps the last call's TMA maps (same pointers: not re-encoded; new pointers: new
    maps); an operand whose address is not 16-byte aligned (a TMA requirement) is refused,
    naming it, before any launch."""
    m, n, k = 16, 64, 128
    xq, xs, wq, ws = quantised_operands(m, n, k, 18)
    spec = launcher.choose_wgmma_spec("dense", m, n, k, "fp32", "blk128", compute_sms=4)
    plan = launcher.GemmPlan.make(spec, (1, 1, 1), engine="sim", m=m, n=n, k=k, b_scale_rows=ws.shape[0])
    first = plan.tensor_maps(xq, wq)
    assert all(a is b for a, b in zip(plan.tensor_maps(xq, wq), first)), "same pointers: maps reused"
    assert plan.tensor_maps(xq.clone(), wq)[0] is not first[0], "new A pointer: a new A map"
    raw = torch.empty(m * k + 8, dtype=torch.uint8)
    shifted = raw[8:].view(torch.float8_e4m3fn).view(m, k)
    shifted.copy_(xq)
    out = poison_(torch.empty(m, n))
    with fmo.use_backend("sim"), pytest.raises(fmo.InputError, match=r"a \(xq\): expected a 16-byte aligned address"):
        fmo.fp8.gemm(shifted, xs, wq, ws, torch.float32, out=out, kernel="wgmma")
    assert torch.isnan(out).all(), "nothing may run before the refusal"


@SIM
@pytest.mark.parametrize("mode", ["contiguous", "masked"])
def test_grouped_with_wide_tiles_across_weight_blocks(mode):
    """Grouped views on tiles whose columns straddle two 128 x 128 weight-scale blocks and whose
    B box runs into the next expert's rows (N = 200 is no multiple of BN): contiguous 128 x 96
    with padding rows and an empty expert, masked 64 x 112 with an empty expert and a partial
    one (A's map spans every expert's Mmax rows); 2 CTAs walk all tiles."""
    groups, n, k = 3, 200, 400
    wq3, ws3 = expert_weights(groups, n, k, 19)
    if mode == "contiguous":
        xq, xs, m_indices = contiguous_layout([70, 0, 140], k, 19)
        spec = launcher.Fp8GemmWgmmaSpec(mode=mode, out="fp32", b_scale="blk128", block_m=128, block_n=96, stages=3)
        out = poison_(torch.empty(xq.shape[0], n))
        launcher.run_kernel(spec, grid=(2, 1, 1), a=xq, a_scale=xs, b=wq3, b_scale=ws3, out=out, m=xq.shape[0], n=n,
                            k=k, groups=groups, m_indices=m_indices, engine="sim")
        assert torch.all(out[m_indices < 0] == 0), "padding rows (-1) must be zero"
        assert_close_to_oracle(out, contiguous_oracle(xq, xs, wq3, ws3, m_indices), "wgmma contiguous 128x96", 19)
        return
    mmax, masked = 100, [0, 100, 37]
    x = torch.randn(groups, mmax, k, generator=torch.Generator().manual_seed(19))
    q = [ref.quantize_per_token_group(x[i]) for i in range(groups)]
    xq3, xs3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
    spec = launcher.Fp8GemmWgmmaSpec(mode=mode, out="fp32", b_scale="blk128", block_m=64, block_n=112, stages=4)
    out = poison_(torch.empty(groups, mmax, n))
    launcher.run_kernel(spec, grid=(2, 1, 1), a=xq3, a_scale=xs3, b=wq3, b_scale=ws3, out=out, m=mmax, n=n, k=k,
                        groups=groups, masked_m=torch.tensor(masked, dtype=torch.int32), engine="sim")
    for g, r in enumerate(masked):
        if r:
            assert_close_to_oracle(out[g, :r], gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g]),
                                   f"wgmma masked 64x112 group {g}", 19)
        assert torch.isnan(out[g, r:]).all(), f"group {g}: rows >= masked_m must not be written"
