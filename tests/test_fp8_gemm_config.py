"""The Hopper FP8 GEMM's block-shape cost model (fastmoe_ops/ops/fp8_gemm_config.py): pure
CPU tests of what it must prefer (full waves, BN dividing N, big tiles at large M, decode rows)
and of the limits it must respect (227 KiB of shared memory, registers after setmaxnreg)."""
import pytest

from fastmoe_ops.ops import fp8_gemm_config as cfg
from fastmoe_ops.runtime.launch import MAX_DYNAMIC_SMEM

DENSE = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]  # DeepSeek-V3 (N, K)


def shapes():
    for m in (1, 64, 100, 128, 300, 4096):
        for n, k in DENSE:
            for sms in (1, 7, 112, 132):
                yield m, n, k, sms


def test_pure_function_of_shape_and_budget_and_waves_over_the_budget():
    for m, n, k, sms in shapes():
        a = cfg.choose_block(m, n, k, sms=sms)
        assert a == cfg.choose_block(m, n, k, sms=sms)
        assert a.tiles == -(-m // a.block_m) * -(-n // a.block_n)
        assert a.waves == -(-a.tiles // sms), (m, n, k, sms, a)


def test_limits_shared_memory_and_registers():
    for out_bytes in (2, 4):
        for m, n, k, sms in shapes():
            a = cfg.choose_block(m, n, k, sms=sms, out_bytes=out_bytes)
            assert a.smem_bytes == cfg.smem_bytes(a.block_m, a.block_n, a.stages) <= MAX_DYNAMIC_SMEM
            assert cfg.MIN_STAGES <= a.stages <= cfg.MAX_STAGES
            assert cfg.accumulator_regs(a.block_m, a.block_n) + cfg.OTHER_REGS <= cfg.MATH_REGS, a
    # 128 x 144 (per thread 72 accumulators + 2 x 72 partial sums + the rest > 232) cannot be picked
    assert not cfg.feasible(128, 144) and not cfg.feasible(256, 128) and cfg.feasible(128, 128) and cfg.feasible(64, 128)
    # a tighter shared-memory limit changes the pick and is obeyed; an impossible one is refused
    small = cfg.choose_block(4096, 4096, 7168, sms=132, smem_limit=100 * 1024)
    assert small.smem_bytes <= 100 * 1024 and small.stages >= cfg.MIN_STAGES
    with pytest.raises(ValueError, match="no candidate tile fits 1000 bytes"):
        cfg.choose_block(4096, 4096, 7168, sms=132, smem_limit=1000)


def test_full_waves():
    # 8 SMs, 512 x 256: 128 x 128 is exactly one full wave; 64 x 128 two, 128 x 192 pads N
    a = cfg.choose_block(512, 256, 7168, sms=8)
    assert (a.block_m, a.block_n, a.tiles, a.waves) == (128, 128, 8, 1), a
    # at the DeepSeek shapes the last wave is mostly busy: <= 1/4 of the SM-waves idle
    for n, k in DENSE:
        for sms in (112, 132):
            a = cfg.choose_block(4096, n, k, sms=sms)
            assert a.tiles / (a.waves * sms) >= 0.75, (n, k, sms, a)


def test_prefers_bn_dividing_n():
    assert cfg.choose_block(4096, 1024, 7168, sms=132, candidates=[(128, 112), (128, 128)]).block_n == 128
    # equal model cost (HBM-bound: one wave of short tiles, 96288 columns): no padded columns wins
    m, n, k = 64, 96 * 1003, 128
    assert cfg.tile_cost(m, n, k, 1, 64, 96, 2000, 2)[0] == cfg.tile_cost(m, n, k, 1, 64, 112, 2000, 2)[0]
    assert n % 112 and cfg.choose_block(m, n, k, sms=2000, candidates=[(64, 112), (64, 96)]).block_n == 96
    # padding counts as work: 1024 columns in tiles of 112 are 10 tiles of which 1/35 is padding
    a = cfg.choose_block(4096, 1024, 7168, sms=1, candidates=[(128, 112), (128, 128)])
    assert a.block_n == 128, a


def test_large_m_uses_large_tiles_small_m_its_own_rows():
    for n, k in DENSE:
        big = cfg.choose_block(4096, n, k, sms=132)
        # bytes per FLOP: (BM + BN) / (2 BM BN): the largest tiles (wave quantisation may trade 128 for 112)
        assert big.block_m == 128 and big.block_n >= 112, big
        for m in (1, 16, 64):
            assert cfg.choose_block(m, n, k, sms=132).block_m == 64
        d = cfg.choose_block(128, n, k, sms=132)
        if -(-n // max(cfg.WGMMA_BLOCK_N)) <= 132:  # one wave over most SMs (the decode tiles make it hold again)
            assert d.block_m == 128 and d.waves == 1 and d.tiles >= 132 // 2, d
        else:  # N 24576: 192 tiles even at BN 128 (the largest BN the registers allow): as few waves as any BN gives
            assert d.block_m == 128 and d.waves == -(-(-(-n // max(cfg.WGMMA_BLOCK_N))) // 132), d
    # decode: the weights stream, so a smaller BN that fills the SMs beats a big one that does not
    assert cfg.choose_block(128, 4096, 7168, sms=132).block_n < 128


def test_decode_picks_narrow_tiles_when_they_fill_more_sms():
    """The rule (fp8_gemm_config's docstring): a narrow BN (16..56) wins where the big tiles leave
    SMs of their wave idle and the narrow one fills them without another wave; not at large M."""
    d = cfg.choose_block(128, 2112, 7168, sms=132)
    wide = cfg.choose_block(128, 2112, 7168, sms=132, candidates=cfg.ws_candidates((64, 96, 112, 128)))
    assert (wide.block_n, wide.tiles, wide.waves) == (64, 33, 1), wide  # what BN >= 64 can do: 99 SMs idle
    assert d.block_n < 64 and d.block_n in cfg.DECODE_BLOCK_N and d.waves == 1 and d.tiles > wide.tiles, d
    assert (d.block_n, d.tiles) == (16, 132), d  # every SM holds one 128 x 16 tile
    for n, k in DENSE:
        for m in (1, 64, 128):
            for sms in (112, 132):
                d = cfg.choose_block(m, n, k, sms=sms)
                w = cfg.choose_block(m, n, k, sms=sms, candidates=cfg.ws_candidates((64, 96, 112, 128)))
                if d.block_n < 64:  # narrow: more SMs busy in no more waves than the wide tiles need
                    assert d.waves <= w.waves and d.tiles / (d.waves * sms) > w.tiles / (w.waves * sms), (d, w)
        for m in (256, 4096):  # large M: the big tiles' bytes per FLOP win
            assert cfg.choose_block(m, n, k, sms=132).block_n >= 64
    assert cfg.choose_block(4096, 2112, 7168, sms=132).block_n >= 112
    # a narrow tile's ring: more stages fit (B box BN x 128 bytes), never under MIN_STAGES
    assert cfg.choose_block(128, 2112, 7168, sms=132).stages == cfg.MAX_STAGES


def test_grouped_counts_every_group_and_refuses_bad_input():
    one = cfg.choose_block(256, 4096, 7168, sms=132)
    four = cfg.choose_block(256, 4096, 7168, groups=4, sms=132)
    assert four.tiles == 4 * -(-256 // four.block_m) * -(-4096 // four.block_n)
    assert one.tiles <= four.tiles
    for bad in (dict(m=0), dict(n=-1), dict(sms=0), dict(groups=1.5)):
        args = dict(m=128, n=128, k=128, groups=1, sms=132) | bad
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int"):
            cfg.choose_block(args.pop("m"), args.pop("n"), args.pop("k"), **args)


def test_raster_band_matches_the_device_scheduler():
    import re
    from pathlib import Path
    header = (Path(__file__).parents[1] / "csrc/gemm/fp8_gemm_ws_scheduler.cuh").read_text()
    assert int(re.search(r"constexpr int kRasterBandM = (\d+);", header).group(1)) == cfg.RASTER_BAND_M


def test_block_ns_are_wgmma_sizes_the_kernel_has():
    """WGMMA_BLOCK_N are N sizes ptx/wgmma.cuh's generated bodies spell out (ptx/gen_wgmma_e4m3.py
    SIZES), each feasible at BM = 128; per-row b scales a subset; the spec's shared memory is the
    model's (one formula: fp8_gemm_config.smem_bytes)."""
    import re
    from pathlib import Path

    from fastmoe_ops.ops import fp8_gemm as launcher

    gen = (Path(__file__).parents[1] / "ptx/gen_wgmma_e4m3.py").read_text()
    sizes = {int(x) for x in re.search(r"SIZES = \(([\d, ]+)\)", gen).group(1).split(",")}
    assert set(cfg.WGMMA_BLOCK_N) <= sizes and set(cfg.WGMMA_BLOCK_N_ROW_SCALES) <= set(cfg.WGMMA_BLOCK_N)
    assert all(cfg.feasible(128, bn) for bn in cfg.WGMMA_BLOCK_N)
    spec = launcher.choose_wgmma_spec("dense", 4096, 4096, 7168, "bf16", "blk128", compute_sms=132)
    assert spec.smem_bytes() == cfg.smem_bytes(spec.block_m, spec.block_n, spec.stages) <= MAX_DYNAMIC_SMEM
    row = launcher.choose_wgmma_spec("dense", 4096, 4096, 7168, "fp32", "row", compute_sms=132)
    assert row.block_n in cfg.WGMMA_BLOCK_N_ROW_SCALES


def test_tma_store_epilogue_staging_boxes_and_rule():
    """The tma_store epilogue: its staging (BM x BN of the output type) comes out of the ring's
    shared memory (fewer stages, never fewer than MIN_STAGES, never over the limit) without
    changing the tile the model ranks first; the box geometry the launcher encodes (store_box:
    the widest swizzle span dividing a tile row, else 16 bytes unswizzled); the one rule for where
    TMA can store the output."""
    from fastmoe_ops.ops import fp8_gemm as launcher

    for out_bytes in (2, 4):
        for m, n, k, sms in shapes():
            a = cfg.choose_block(m, n, k, sms=sms, out_bytes=out_bytes)
            t = cfg.choose_block(m, n, k, sms=sms, out_bytes=out_bytes, epilogue="tma_store")
            staging = a.block_m * a.block_n * out_bytes
            assert (t.block_m, t.block_n) == (a.block_m, a.block_n), (m, n, k, sms)
            assert t.smem_bytes == cfg.smem_bytes(t.block_m, t.block_n, t.stages, staging) <= MAX_DYNAMIC_SMEM
            assert cfg.MIN_STAGES <= t.stages <= a.stages
    # 128 x 128 fp32: 64 KiB of staging leaves 5 of the registers epilogue's 7 stages
    assert [cfg.choose_block(4096, 7168, 2048, sms=132, out_bytes=4, epilogue=e).stages for e in cfg.EPILOGUES] == [7, 5]
    with pytest.raises(ValueError, match="epilogue must be one of"):
        cfg.choose_block(128, 128, 128, sms=1, epilogue="smem")
    assert [cfg.store_box(bn, 2) for bn in (128, 64, 32, 16, 24, 40, 56)] == [
        (128, 128), (128, 128), (64, 64), (32, 32), (16, 0), (16, 0), (16, 0)]
    assert [cfg.store_box(bn, 4) for bn in (128, 96, 48, 40, 16)] == [(128, 128), (128, 128), (64, 64), (32, 32), (64, 64)]
    assert cfg.tma_store_possible(264, 2) and not cfg.tma_store_possible(260, 2) and cfg.tma_store_possible(260, 4)
    assert not cfg.tma_store_possible(264, 2, out_address=0x1008) and cfg.tma_store_possible(264, 2, out_address=0x1010)
    assert [cfg.choose_epilogue(e, 260, 2) for e in (None, "registers", "tma_store")] == ["registers"] * 3
    assert cfg.choose_epilogue("tma_store", 264, 2) == "tma_store"
    spec = launcher.choose_wgmma_spec("dense", 4096, 4096, 7168, "fp32", "blk128", compute_sms=132, epilogue="tma_store")
    assert spec.epilogue == "tma_store" and spec.store_box() == ((32, 64), 128)
    assert spec.smem_bytes() == cfg.smem_bytes(spec.block_m, spec.block_n, spec.stages,
                                               cfg.staging_bytes(spec.block_m, spec.block_n, 4, "tma_store"))
