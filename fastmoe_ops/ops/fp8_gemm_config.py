"""Block-shape choice of the Hopper FP8 GEMM by a cost model, not a hand list.

User: the warp-specialised Hopper kernel (csrc/gemm/fp8_gemm_wgmma.cuh), through
fp8_gemm.choose_wgmma_spec: choose_block() over its (BM, BN), BN among the wgmma sizes it has.

choose_block(m, n, k, groups=, sms=) is a pure function of the problem and the SM budget
(integers and Python floats only), so every rank of an expert-parallel job picks the same
shape and compiles the same kernel. The model ranks candidate tiles; it predicts no time:
its constants are datasheet-order rates of an H100/H200 SXM, and only their ratios matter.

For a tile BM x BN over K (kb = ceil(K / 128) blocks of 128):
  waves      ceil(tiles / sms): a persistent grid of min(tiles, sms) CTAs runs the tiles in
             waves; a last partial wave costs a whole one (the SMs it leaves idle are lost).
  per tile   kb * max(MMA cycles, L2->SM load cycles) + fixed (pipeline fill + epilogue):
             MMA = 2 BM BN 128 / FP8_FLOP_PER_SM_CYCLE, load = 128 (BM + BN) / L2_BYTES_PER_SM_CYCLE
             -- bytes per FLOP: (BM + BN) / (2 BM BN) favours large, square tiles.
  HBM        the bytes that leave DRAM: A and B once when they fit half the L2, else per wave
             the A row-blocks and B column-blocks the wave's tiles touch (the scheduler's raster
             band of RASTER_BAND_M m-blocks: ~band A blocks and ~sms / band B blocks); plus the
             output once.
  cost       max(waves * per tile, HBM bytes / HBM_BYTES_PER_CYCLE).
Ties go to BN dividing N (no padded columns), then fewer tiles, then larger BN, BM.

Feasibility: shared memory (stages * (128 (BM + BN) + barriers), plus the tma_store epilogue's
staging, BM x BN of the output type; the registers epilogue and the plain-load scales take none)
<= 227 KiB with at least MIN_STAGES stages (the staging costs the ring its last stage or two); registers: each math warpgroup holds 64 rows (BM = 64: one warpgroup,
128: two), i.e. an accumulator and two partial sums of BN / 2 fp32 per thread (the promotion
of block kb-1 runs while block kb's MMAs write the other), under the MATH_REGS a thread gets
after setmaxnreg moves the producer's registers to the math warpgroups.

Decode (M <= 128 rows per group) gets its own candidate rows: BM = 64 when M <= 64 (a 128-row
tile would be half padding), else 128; its BN is then what the model gives.

Narrow tiles (BN 16..56, the decode sizes) are candidates at every shape, and the same model
decides. The rule it implies: at a fixed BM, a narrower tile streams fewer bytes per K block
(128 (BM + BN)), so among BN with the same number of waves the narrower one is cheaper per
tile; at large M the waves grow with the tile count and the total is ~ waves * per-tile ~ the
bytes per output (BM + BN) / (BM BN), which the big tiles win. So a narrow BN wins where the
big tiles leave SMs of their (often only) wave idle and a narrower one fills them without
adding a wave: decode (M <= 128) and other problems of fewer tiles than SMs. E.g. M 128 x
N 2112 x K 7168 on 132 SMs: BN 64 is 33 tiles (99 SMs idle), BN 16 is 132 tiles in the same
one wave, every SM streaming its slice of the weights. Where the HBM term decides (operands
past half the L2, many waves) the bytes re-read per wave rank the tiles instead (8 experts of
24576 x 7168 at decode: BN 56 over 64 by ~1%). At M >= 256 on the DeepSeek-V3 shapes the big
tiles stay (tests/test_fp8_gemm_config.py checks both).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import expect
from ..runtime.launch import MAX_DYNAMIC_SMEM

BLOCK_K = 128                    # one promotion (scale) block along K
FP8_FLOP_PER_SM_CYCLE = 8192     # wgmma e4m3 dense: ~1979 TFLOP/s / 132 SMs / 1.83 GHz
L2_BYTES_PER_SM_CYCLE = 48       # L2 -> SM fill rate per SM (order of magnitude; unmeasured here)
HBM_BYTES_PER_CYCLE = 2600       # ~4.8 TB/s at 1.83 GHz (H200 datasheet)
L2_BYTES = 50 * 1024 * 1024      # Hopper L2
TILE_FIXED_CYCLES = 1500         # pipeline fill + epilogue per tile (order of magnitude)
RASTER_BAND_M = 8                # m-blocks per raster band: csrc/gemm/fp8_gemm_ws_scheduler.cuh
MIN_STAGES, MAX_STAGES = 3, 8    # fewer stages cannot hide a TMA round trip behind the MMAs
MATH_REGS = 232                  # per math thread after setmaxnreg (the kernel's kMathRegs; producer keeps 40)
OTHER_REGS = 40                  # addresses, scales, loop state of a math thread
BARRIER_BYTES = 16               # full + empty mbarrier per stage
WARPGROUP_ROWS = 64              # wgmma's M: the rows of one math warpgroup (and of a TMA-store box)
# The kernel's two epilogues (csrc/gemm/fp8_gemm_epilogue.cuh). registers stays the default until a
# GPU run of bench/bench_fp8.py, which times both on its dense rows, says otherwise.
EPILOGUES = ("registers", "tma_store")
DEFAULT_EPILOGUE = "registers"


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    stages: int
    smem_bytes: int
    tiles: int
    waves: int
    cost: float                  # model cycles: a rank, not a time

    @property
    def math_warpgroups(self) -> int:
        return 1 if self.block_m == 64 else 2


# The wgmma N sizes ptx/wgmma.cuh wraps (ptx/gen_wgmma_e4m3.py SIZES) that the kernel's registers
# allow: BN <= 128 (accumulator_regs; tests/test_fp8_gemm_config.py keeps these within SIZES);
# 16..56 are the decode tiles. Per-row b scales (the wgrad layout) hold BN / 32 more registers
# per K block in flight: BN 128 spills there (ptxas, sm_90a), 112 does not.
DECODE_BLOCK_N = (16, 24, 32, 40, 48, 56)
WGMMA_BLOCK_N = DECODE_BLOCK_N + (64, 96, 112, 128)
WGMMA_BLOCK_N_ROW_SCALES = DECODE_BLOCK_N + (64, 96, 112)


def ws_candidates(block_ns=WGMMA_BLOCK_N):
    """(BM, BN) of the warp-specialised kernel: BM = 64 (one math warpgroup) or 128 (two x 64
    rows); BN from `block_ns` (wgmma N sizes the kernel has)."""
    return tuple((bm, bn) for bm in (64, 128) for bn in block_ns)


def accumulator_regs(block_m: int, block_n: int) -> int:
    """fp32 registers per math thread: the accumulator and two partial sums (the K block whose
    MMAs run and the one being promoted), BN / 2 each per 64 rows a warpgroup holds."""
    rows_per_warpgroup = block_m if block_m == 64 else block_m // 2
    return 3 * (rows_per_warpgroup // 64) * (block_n // 2)


def tma_store_possible(n: int, out_bytes: int, out_address: int = 0) -> bool:
    """The rule for the tma_store epilogue, in one place: TMA can store the output when its rows
    (the map's row stride, N * out_bytes) are a multiple of 16 bytes and the output starts at a
    16-byte aligned address (runtime/tensor_map.py requires both). Elsewhere the launcher runs
    the registers epilogue: at plan time for N, per call for the address (fp8_gemm.GemmPlan)."""
    return (n * out_bytes) % 16 == 0 and out_address % 16 == 0


def choose_epilogue(requested: str | None, n: int, out_bytes: int) -> str:
    """The wgmma kernel's epilogue: `requested` (None: DEFAULT_EPILOGUE), but registers where TMA
    cannot store an N-column output (tma_store_possible; the launcher checks the output's
    address per call). A name not in EPILOGUES is refused, naming the argument."""
    epilogue = DEFAULT_EPILOGUE if requested is None else requested
    expect(epilogue in EPILOGUES, "epilogue", f"one of {EPILOGUES} (or None: the default)", requested)
    if epilogue == "tma_store" and not tma_store_possible(n, out_bytes):
        return "registers"
    return epilogue


def store_box(block_n: int, out_bytes: int) -> tuple:
    """(inner bytes, swizzle bytes) of the tma_store epilogue's boxes of [64 rows][inner bytes]
    (csrc/gemm/fp8_gemm_epilogue.cuh StoreBox, which this mirrors): the widest swizzle span
    (128, 64, 32) dividing a tile row of block_n * out_bytes bytes, else 16 bytes unswizzled."""
    row = block_n * out_bytes
    inner = next((span for span in (128, 64, 32) if row % span == 0), 16)
    return inner, inner if inner >= 32 else 0


def staging_bytes(block_m: int, block_n: int, out_bytes: int, epilogue: str) -> int:
    """Shared memory of the epilogue: tma_store stages a block_m x block_n output tile (each math
    warpgroup its 64 rows, outside the ring); registers none."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"staging_bytes: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    return block_m * block_n * out_bytes if epilogue == "tma_store" else 0


def smem_bytes(block_m: int, block_n: int, stages: int, staging: int = 0) -> int:
    """The ring (A and B boxes plus a full and an empty mbarrier per stage; scales are read by
    plain loads) after `staging` bytes of epilogue staging (staging_bytes)."""
    return staging + stages * (BLOCK_K * (block_m + block_n) + BARRIER_BYTES)


def _max_stages(block_m: int, block_n: int, smem_limit: int, staging: int = 0) -> int:
    for stages in range(MAX_STAGES, MIN_STAGES - 1, -1):
        if smem_bytes(block_m, block_n, stages, staging) <= smem_limit:
            return stages
    return 0


def _hbm_bytes(m: int, n: int, k: int, groups: int, bm: int, bn: int, sms: int, out_bytes: int) -> float:
    tiles_m, tiles_n = -(-m // bm), -(-n // bn)
    operands = groups * (m + n) * k          # fp8: one byte per element (scales are ~1/128 of it)
    out = groups * m * n * out_bytes
    if operands <= L2_BYTES // 2:
        return float(operands + out)
    tiles = groups * tiles_m * tiles_n
    in_flight = min(tiles, sms)
    band = min(RASTER_BAND_M, tiles_m)
    a_blocks, b_blocks = band, min(tiles_n, -(-in_flight // band))
    waves = -(-tiles // sms)
    return float(max(operands, waves * (a_blocks * bm + b_blocks * bn) * k) + out)


def tile_cost(m: int, n: int, k: int, groups: int, bm: int, bn: int, sms: int, out_bytes: int) -> tuple:
    """(model cycles, tiles, waves) of one candidate."""
    tiles = groups * -(-m // bm) * -(-n // bn)
    waves = -(-tiles // sms)
    kb = -(-k // BLOCK_K)
    mma = 2 * bm * bn * BLOCK_K / FP8_FLOP_PER_SM_CYCLE
    load = BLOCK_K * (bm + bn) / L2_BYTES_PER_SM_CYCLE
    per_tile = kb * max(mma, load) + TILE_FIXED_CYCLES
    hbm = _hbm_bytes(m, n, k, groups, bm, bn, sms, out_bytes) / HBM_BYTES_PER_CYCLE
    return max(waves * per_tile, hbm), tiles, waves


def feasible(bm: int, bn: int, smem_limit: int = MAX_DYNAMIC_SMEM, staging: int = 0) -> bool:
    return accumulator_regs(bm, bn) + OTHER_REGS <= MATH_REGS and _max_stages(bm, bn, smem_limit, staging) >= MIN_STAGES


def choose_block(m: int, n: int, k: int, *, groups: int = 1, sms: int, out_bytes: int = 2,
                 candidates=None, smem_limit: int = MAX_DYNAMIC_SMEM, epilogue: str = DEFAULT_EPILOGUE) -> BlockConfig:
    """The cheapest feasible tile for `groups` problems of m x n x k (m: rows per group; a
    contiguous layout passes its total rows and groups=1) on `sms` SMs. The epilogue only
    changes the shared memory left to the ring (its stages and feasibility), not the ranking."""
    for name, v in (("m", m), ("n", n), ("k", k), ("groups", groups), ("sms", sms)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"choose_block: {name} must be a positive int, got {v!r}")
    cands = tuple(candidates or ws_candidates())
    if m <= 128:  # decode: the smallest warpgroup multiple that holds the rows
        rows = 64 if m <= 64 else 128
        decode = tuple(c for c in cands if c[0] == rows)
        cands = decode or cands
    staging = {c: staging_bytes(*c, out_bytes, epilogue) for c in cands}
    fits = [(bm, bn) for bm, bn in cands if feasible(bm, bn, smem_limit, staging[bm, bn])]
    if not fits:
        raise ValueError(f"choose_block: no candidate tile fits {smem_limit} bytes of shared memory "
                         f"and {MATH_REGS} registers: {cands}")
    bm, bn = cheapest(m, n, k, groups=groups, sms=sms, out_bytes=out_bytes, tiles=fits)
    cost, tiles, waves = tile_cost(m, n, k, groups, bm, bn, sms, out_bytes)
    stages = _max_stages(bm, bn, smem_limit, staging[bm, bn])
    return BlockConfig(bm, bn, stages, smem_bytes(bm, bn, stages, staging[bm, bn]), tiles, waves, cost)


def cheapest(m: int, n: int, k: int, *, groups: int, sms: int, out_bytes: int, tiles) -> tuple:
    """The (BM, BN) of `tiles` (all feasible for the caller's kernel) the model ranks first;
    ties go to BN dividing N, then fewer tiles, then larger BN, BM."""
    def key(tile):
        bm, bn = tile
        cost, count, _ = tile_cost(m, n, k, groups, bm, bn, sms, out_bytes)
        return (cost, n % bn != 0, count, -bn, -bm)
    return min(tiles, key=key)
