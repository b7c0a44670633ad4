"""Launcher of the FP8 GEMM with DeepSeek's fine-grained scaling (csrc/gemm/fp8_gemm.cuh).

    y [M, N] = (xq * xs) @ (wq * ws)^T, promoted to fp32 at every 128 of K
xq: [M, K] float8_e4m3fn, xs: [M, ceil(K/128)] fp32 (1 x 128 groups)
wq: [N, K] float8_e4m3fn, ws: [ceil(N/128), ceil(K/128)] fp32 (128 x 128 blocks)
                       or ws: [N, ceil(K/128)] fp32 (1 x 128 groups: the wgrad layout)
All contiguous; K % 16 == 0 (rows of 16-byte multiples: cp.async's chunks, TMA's row stride; pad K
with zeros otherwise); the wgmma kernel also wants xq and wq 16-byte aligned (TMA).
The grouped variants (fp8_gemm_grouped.py) share the specs, the heuristics and the kernels.

Two kernels (`kernel_for`): on sm_90a (Hopper GPUs, and the simulator, which models one)
the warp-specialised wgmma kernel (csrc/gemm/fp8_gemm_wgmma.cuh: a TMA producer warp, wgmma math
warpgroups, an mbarrier ring, persistent CTAs over the SM budget);
elsewhere (sm_89) the mma.sync kernel (csrc/gemm/fp8_gemm.cuh). `kernel=` forces either.
"""
from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import backends
from ..budget import sm_budget
from ..errors import UnsupportedError, expect
from ..reference import fp8 as reference
from ..runtime.launch import MAX_DYNAMIC_SMEM, LaunchConfig, launch
from ..runtime.plans import PlanCache
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, register_op
from ..runtime.tensor_map import TMA_DESCRIPTOR, aligned_fields, descriptor, encode_tiled
from . import fp8_gemm_config

BLOCK_K = 128                       # the scale block along K (one promotion per block)
MODES = ("dense", "contiguous", "masked")
OUT_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
B_SCALES = {"blk128": 128, "row": 1}  # b-scale granularity: 128 x 128 blocks or 1 x 128 rows


class Fp8GemmParams(Params):
    cpp_name = "fmo::Fp8GemmParams"
    _fields_ = [
        ("a", ctypes.c_void_p),
        ("a_scale", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("b_scale", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("m_indices", ctypes.c_void_p),
        ("masked_m", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("k_blocks", ctypes.c_int64),
        ("b_scale_rows", ctypes.c_int64),
        ("num_groups", ctypes.c_int64),
    ]


def _cpp_bool(v: bool) -> str:
    return "true" if v else "false"


def _refuser(spec):
    def refuse(msg):
        raise UnsupportedError(f"{spec.op} {spec}: {msg}")
    return refuse


def _check_problem_fields(spec, refuse) -> None:
    """The fields both GEMM kernels share: which problem (mode), output and weight scales."""
    if spec.mode not in MODES:
        refuse(f"mode must be one of {MODES}")
    if spec.out not in ("bf16", "fp32"):
        refuse("out must be bf16 or fp32")
    if spec.b_scale not in B_SCALES:
        refuse(f"b_scale must be one of {tuple(B_SCALES)}")


@dataclass(frozen=True)
class Fp8GemmSpec(KernelSpec):
    mode: str        # dense | contiguous | masked
    out: str         # bf16 | fp32
    b_scale: str     # blk128 (weights) | row (1 x 128 groups, wgrad)
    block_m: int
    block_n: int
    warps_m: int
    warps_n: int
    stages: int

    op: ClassVar[str] = "fp8_gemm"
    header: ClassVar[str] = "csrc/gemm/fp8_gemm.cuh"
    params: ClassVar[type[Params]] = Fp8GemmParams

    def check(self) -> None:
        super().check()
        refuse = _refuser(self)
        _check_problem_fields(self, refuse)
        wm, wn = self.block_m // max(self.warps_m, 1), self.block_n // max(self.warps_n, 1)
        if self.warps_m * self.warps_n not in (4, 8, 16) or wm * self.warps_m != self.block_m or wn * self.warps_n != self.block_n:
            refuse("4, 8 or 16 warps must tile block_m x block_n")
        if wm % 16 or wn % 16:
            refuse("each warp's tile must be a multiple of 16 x 16 (m16 MMA rows, ldmatrix.x4 pairs of n8 tiles)")
        if self.block_m > self.threads() or (self.block_m * 8) % self.threads() or (self.block_n * 8) % self.threads():
            refuse("the loads must split evenly over the threads")
        if self.b_scale == "blk128" and 128 % self.block_n:
            refuse("with 128 x 128 b-scale blocks, block_n must divide 128")
        if self.mode == "contiguous" and contiguous_alignment() % self.block_m:
            refuse(f"block_m must divide the contiguous alignment {contiguous_alignment()}")
        if not 2 <= self.stages <= 8 or self.smem_bytes() > MAX_DYNAMIC_SMEM:
            refuse(f"stages must be 2..8 and fit {MAX_DYNAMIC_SMEM} bytes of shared memory")

    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def block_threads(self) -> int:
        return self.threads()

    def smem_bytes(self) -> int:  # mirrors MainloopShape::kSmemBytes
        b_scales = 1 if B_SCALES[self.b_scale] % self.block_n == 0 else self.block_n
        return self.stages * (BLOCK_K * (self.block_m + self.block_n) + 4 * (self.block_m + b_scales))

    def device_call(self) -> str:
        mode = {"dense": "kDense", "contiguous": "kContiguous", "masked": "kMasked"}[self.mode]
        return (f"fmo::fp8_gemm<fmo::gemm::{mode}, {self.block_m}, {self.block_n}, {self.warps_m}, {self.warps_n}, "
                f"{self.stages}, {B_SCALES[self.b_scale]}, {CUDA_TYPE[self.out]}>(p)")


def contiguous_alignment() -> int:
    """Rows per aligned segment of the grouped contiguous layout: every group's rows start
    at a multiple of this (pad with m_indices = -1 rows). A multiple of every block_m."""
    return 128


# Tile configs the heuristic picks from: (block_m, block_n, warps_m, warps_n, stages).
# LARGE's warps own 64 x 32 outputs (64 fp32 accumulators + 64 per-K-block partial sums per
# thread: ~250 of 255 registers on sm_90a, no spills); a 16-warp 128 x 128 tile would cap
# threads at 128 registers and spill. The others' warps own 32 x 32.
LARGE = (128, 128, 2, 4, 3)   # 8 warps: the throughput tile
WIDE = (64, 128, 2, 4, 4)     # 8 warps: small M (decode, few tokens per expert)
SMALL = (64, 64, 2, 2, 4)     # 4 warps: more CTAs when tiles are fewer than SMs
CONFIGS = (LARGE, WIDE, SMALL)


def choose_spec(mode: str, m: int, n: int, k: int, out: str, b_scale: str, *, groups: int = 1,
                compute_sms: int | None = None) -> Fp8GemmSpec:
    """Pure heuristic of (shape, SM budget) for the mma.sync kernel: the largest tile that
    still gives every SM a tile, else the one with the most tiles. m is the rows per group
    (masked: Mmax). The wgmma kernel's heuristic is choose_wgmma_spec."""
    sms = sm_budget().compute_sms if compute_sms is None else compute_sms

    def tiles(cfg):
        return groups * -(-m // cfg[0]) * -(-n // cfg[1])

    candidates = [c for c in CONFIGS if not (m <= 64 and c[0] > 64)]
    if mode == "masked":  # decode-sized groups; its 128 x 128 variant spills on sm_90a (255 registers)
        candidates = [c for c in candidates if c[0] <= 64]
    if b_scale == "blk128":
        candidates = [c for c in candidates if 128 % c[1] == 0]
    chosen = next((c for c in candidates if tiles(c) >= sms), candidates[-1])
    bm, bn, wm, wn, st = chosen
    return Fp8GemmSpec(mode=mode, out=out, b_scale=b_scale, block_m=bm, block_n=bn, warps_m=wm, warps_n=wn, stages=st)


# DeepSeek-V3 layers (M, N, K) the registered variants are chosen for.
STANDARD_SHAPES = ((128, 7168, 2048), (4096, 7168, 2048), (128, 2048, 7168), (4096, 4096, 7168), (4096, 7168, 18432),
                   (16, 4096, 7168))


@register_op("fp8_gemm")
def standard_specs():
    """The variants the heuristic picks for the standard shapes (DeepSeek-V3 layers, grouped
    MoE with 8-32 experts, wgrad with 1 x 128 b scales)."""
    seen = set()
    for m, n, k in STANDARD_SHAPES:
        for out in ("bf16", "fp32"):
            seen.add(choose_spec("dense", m, n, k, out, "blk128"))
        seen.add(choose_spec("dense", n, k, m, "fp32", "row"))      # wgrad: [N, M] x [K, M]^T
        seen.add(choose_spec("contiguous", m, n, k, "bf16", "blk128"))
        for g in (8, 32):
            seen.add(choose_spec("masked", max(m // g, 1), n, k, "bf16", "blk128", groups=g))
    yield from sorted(seen, key=lambda s: s.entry_name())


# ------------------------------------------------------------------ Hopper: wgmma kernel

class Fp8GemmWsParams(Params):
    """The warp-specialised kernel's Params: the shared fields, then A's and B's TMA maps."""
    cpp_name = "fmo::Fp8GemmWsParams"
    _fields_ = aligned_fields([("g", Fp8GemmParams), ("a_map", TMA_DESCRIPTOR), ("b_map", TMA_DESCRIPTOR),
                               ("out_map", TMA_DESCRIPTOR)])  # out_map: the tma_store epilogue's (else unused)


def wgmma_block_ns(b_scale: str) -> tuple:
    """The BN sizes the wgmma kernel takes with this b-scale layout (fp8_gemm_config owns them)."""
    return fp8_gemm_config.WGMMA_BLOCK_N_ROW_SCALES if b_scale == "row" else fp8_gemm_config.WGMMA_BLOCK_N


@dataclass(frozen=True)
class Fp8GemmWgmmaSpec(KernelSpec):
    """The sm_90a kernel (csrc/gemm/fp8_gemm_wgmma.cuh): a TMA producer warp, BM / 64 math
    warpgroups of wgmma.m64n{block_n}k32, a ring of `stages` full/empty mbarrier stages,
    persistent grid; epilogue: registers straight to global, or staged in shared memory and
    TMA-stored (csrc/gemm/fp8_gemm_epilogue.cuh). unsafe_early_release, unsafe_store_reuse: tests
    only (pipeline bugs the simulator must catch: a stage released before its MMAs retired, the
    staging overwritten before the TMA store read it)."""
    mode: str        # dense | contiguous | masked
    out: str         # bf16 | fp32
    b_scale: str     # blk128 | row
    block_m: int     # 64 (one math warpgroup) or 128 (two)
    block_n: int     # a wgmma N: WGMMA_BLOCK_N
    stages: int
    epilogue: str = fp8_gemm_config.DEFAULT_EPILOGUE  # registers | tma_store
    unsafe_early_release: bool = False
    unsafe_store_reuse: bool = False

    op: ClassVar[str] = "fp8_gemm_wgmma"
    header: ClassVar[str] = "csrc/gemm/fp8_gemm_wgmma.cuh"
    params: ClassVar[type[Params]] = Fp8GemmWsParams
    archs: ClassVar[tuple[str, ...]] = ("sm_90a",)  # wgmma, setmaxnreg: other targets fail with ptx/'s #error

    def check(self) -> None:
        super().check()
        refuse = _refuser(self)
        _check_problem_fields(self, refuse)
        if self.block_m not in (64, 128):
            refuse("block_m must be 64 or 128 (one or two math warpgroups of wgmma's 64 rows)")
        if self.block_n not in wgmma_block_ns(self.b_scale):
            refuse(f"block_n must be one of {wgmma_block_ns(self.b_scale)} with b_scale {self.b_scale} (wgmma N "
                   "sizes ptx/wgmma.cuh wraps whose accumulator and two partial sums fit the registers)")
        if self.epilogue not in fp8_gemm_config.EPILOGUES:
            refuse(f"epilogue must be one of {fp8_gemm_config.EPILOGUES}")
        if self.unsafe_store_reuse and self.epilogue != "tma_store":
            refuse("unsafe_store_reuse is a bug of the tma_store epilogue")
        if not 2 <= self.stages <= 8 or self.smem_bytes() > MAX_DYNAMIC_SMEM:
            refuse(f"stages must be 2..8 and fit {MAX_DYNAMIC_SMEM} bytes of shared memory")

    def block_threads(self) -> int:
        return 128 + 2 * self.block_m  # the producer warpgroup + block_m / 64 math warpgroups

    def out_bytes(self) -> int:
        return 4 if self.out == "fp32" else 2

    def smem_bytes(self) -> int:  # mirrors WsSmem::kSmemBytes (device_call asserts it)
        staging = fp8_gemm_config.staging_bytes(self.block_m, self.block_n, self.out_bytes(), self.epilogue)
        return fp8_gemm_config.smem_bytes(self.block_m, self.block_n, self.stages, staging)

    def store_box(self) -> tuple:
        """The out map's box (inner elements, rows) and swizzle bytes: tma_store only."""
        inner, swizzle = fp8_gemm_config.store_box(self.block_n, self.out_bytes())
        return (inner // self.out_bytes(), fp8_gemm_config.WARPGROUP_ROWS), swizzle

    def device_call(self) -> str:
        """The kernel call, after static_asserts that smem_bytes() (the launch's request) and the
        out map's box (store_box) are the kernel's own: a drift between them cannot compile."""
        mode = {"dense": "kDense", "contiguous": "kContiguous", "masked": "kMasked"}[self.mode]
        out, epilogue = CUDA_TYPE[self.out], {"registers": "kRegisters", "tma_store": "kTmaStore"}[self.epilogue]
        smem = f"fmo::WsSmem<{self.block_m}, {self.block_n}, {self.stages}, {B_SCALES[self.b_scale]}, {out}, fmo::gemm::{epilogue}>"
        box = f"fmo::gemm::StoreBox<{self.block_n}, {out}>"
        (cols, _), swizzle = self.store_box()
        return (f'static_assert({smem}::kSmemBytes == {self.smem_bytes()}, "{self.entry_name()}: the launcher\'s '
                f'shared memory size differs from the kernel\'s"); '
                f'static_assert({box}::kCols == {cols} && {box}::kSwizzle == {swizzle}, "{self.entry_name()}: the '
                f'launcher\'s out map box differs from the kernel\'s"); '
                f"fmo::fp8_gemm_wgmma<fmo::gemm::{mode}, {self.block_m}, {self.block_n}, {self.stages}, "
                f"{B_SCALES[self.b_scale]}, {out}, fmo::gemm::{epilogue}, {_cpp_bool(self.unsafe_early_release)}, "
                f"{_cpp_bool(self.unsafe_store_reuse)}>(p)")


def choose_wgmma_spec(mode: str, m: int, n: int, k: int, out: str, b_scale: str, *, groups: int = 1,
                      compute_sms: int | None = None, epilogue: str | None = None) -> Fp8GemmWgmmaSpec:
    """Pure function of (shape, SM budget, epilogue request): the tile and ring depth the cost
    model (fp8_gemm_config.choose_block: waves over the budget, bytes per FLOP, L2 reuse; decode
    rows) ranks first among the kernel's (BM, BN), and the epilogue (fp8_gemm_config.choose_epilogue)."""
    sms = sm_budget().compute_sms if compute_sms is None else compute_sms
    out_bytes = 4 if out == "fp32" else 2
    epilogue = fp8_gemm_config.choose_epilogue(epilogue, n, out_bytes)
    c = fp8_gemm_config.choose_block(m, n, k, groups=groups, sms=sms, out_bytes=out_bytes, epilogue=epilogue,
                                     candidates=fp8_gemm_config.ws_candidates(wgmma_block_ns(b_scale)))
    return Fp8GemmWgmmaSpec(mode=mode, out=out, b_scale=b_scale, block_m=c.block_m, block_n=c.block_n, stages=c.stages,
                            epilogue=epilogue)



def persistent_grid(spec: Fp8GemmWgmmaSpec, m: int, n: int, *, groups: int = 1, compute_sms: int | None = None) -> tuple:
    """min(tiles, SM budget) CTAs (csrc/gemm/fp8_gemm_ws_scheduler.cuh): a pure function of
    (M, N, groups, tile, budget.compute_sms). m: rows per group (masked: Mmax)."""
    sms = sm_budget().compute_sms if compute_sms is None else compute_sms
    tiles = groups * -(-m // spec.block_m) * -(-n // spec.block_n)
    return (max(1, min(tiles, sms)), 1, 1)


KERNELS = ("wgmma", "mma_sync")


def kernel_for(engine: str, device: torch.device) -> str:
    """wgmma on sm_90a: a Hopper GPU, or the simulator (it models one: budget.SIMULATED_NUM_SMS);
    mma.sync elsewhere (sm_89; wgmma is sm_90a-only). A function of the device alone, so the
    same on every rank."""
    if engine == "cuda":
        return "wgmma" if torch.cuda.get_device_capability(device) == (9, 0) else "mma_sync"
    return "wgmma"


def select(mode: str, kernel: str, m: int, n: int, k: int, out: str, b_scale: str, *, groups: int = 1,
           heuristic_m: int | None = None, epilogue: str | None = None):
    """(spec, grid) of one launch. m: rows of a (masked: Mmax, per group); heuristic_m: the
    rows per group the tile heuristic assumes (default m). groups multiplies the tiles only
    when masked: a contiguous a already holds every group's rows in its m. epilogue: the
    wgmma kernel's request (fp8_gemm_config.choose_epilogue, which also refuses a bad name for
    the mma.sync kernel, whose one epilogue stores registers)."""
    expect(kernel in KERNELS, "kernel", f"one of {KERNELS} (or None: by device)", kernel)
    epilogue = fp8_gemm_config.choose_epilogue(epilogue, n, 4 if out == "fp32" else 2)
    hm = heuristic_m or m
    tile_groups = groups if mode == "masked" else 1
    if kernel == "wgmma":
        spec = choose_wgmma_spec(mode, hm, n, k, out, b_scale, groups=tile_groups, epilogue=epilogue)
        return spec, persistent_grid(spec, m, n, groups=tile_groups)
    spec = choose_spec(mode, hm, n, k, out, b_scale, groups=tile_groups)
    grid = (-(-n // spec.block_n), -(-m // spec.block_m)) + ((groups,) if mode == "masked" else ())
    expect(grid[1] <= 65535, "xq", f"at most {65535 * spec.block_m} rows (per group)", m)
    expect(grid[-1] <= 65535 or mode != "masked", "xq", "at most 65535 groups (grid.z of the mma.sync kernel)", groups)
    return spec, grid


@register_op("fp8_gemm_wgmma")
def standard_wgmma_specs():
    """The wgmma variants the heuristic picks for the standard shapes (as standard_specs)."""
    seen = set()
    for m, n, k in STANDARD_SHAPES:
        for out in ("bf16", "fp32"):
            seen.add(choose_wgmma_spec("dense", m, n, k, out, "blk128", compute_sms=132))
        seen.add(choose_wgmma_spec("dense", n, k, m, "fp32", "row", compute_sms=132))
        seen.add(choose_wgmma_spec("contiguous", m, n, k, "bf16", "blk128", compute_sms=132))
        for g in (8, 32):
            seen.add(choose_wgmma_spec("masked", max(m // g, 1), n, k, "bf16", "blk128", groups=g, compute_sms=132))
    yield from sorted(seen, key=lambda s: s.entry_name())


@register_op("fp8_gemm_wgmma_tma_store")
def tma_store_wgmma_specs():
    """The tma_store twins of the standard dense wgmma variants (bench/bench_fp8.py times both
    epilogues on a GPU): apart from standard_wgmma_specs, which are the default's choices."""
    seen = {choose_wgmma_spec("dense", m, n, k, out, "blk128", compute_sms=132, epilogue="tma_store")
            for m, n, k in STANDARD_SHAPES for out in ("bf16", "fp32")}
    yield from sorted(seen, key=lambda s: s.entry_name())


def _is_e4m3(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float8_e4m3fn


def validate_operand(q, s, name_q: str, name_s: str, lead: tuple, rows: int, k: int, scale_rows: tuple) -> None:
    """q: [*lead, rows, K] e4m3 contiguous; s: [*lead, r, ceil(K/128)] fp32 contiguous, r in scale_rows."""
    expect(_is_e4m3(q), name_q, "a float8_e4m3fn tensor", getattr(q, "dtype", type(q).__name__))
    expect(tuple(q.shape) == (*lead, rows, k), name_q, f"shape {(*lead, rows, k)}", tuple(q.shape))
    expect(q.is_contiguous(), name_q, "a contiguous tensor", f"strides {q.stride()}")
    expect(isinstance(s, torch.Tensor) and s.dtype == torch.float32, name_s, "a float32 tensor", getattr(s, "dtype", type(s).__name__))
    kb = -(-k // BLOCK_K)
    want = " or ".join(str((*lead, r, kb)) for r in scale_rows)
    expect(s.dim() == len(lead) + 2 and tuple(s.shape[:-2]) == lead and s.shape[-2] in scale_rows and s.shape[-1] == kb,
           name_s, f"shape {want}", tuple(s.shape))
    expect(s.is_contiguous(), name_s, "a contiguous tensor", f"strides {s.stride()}")
    expect(s.device == q.device, name_s, f"a tensor on {q.device} (like {name_q})", s.device)


def validate_common(k: int, out_dtype) -> None:
    expect(k % 16 == 0, "K", "a multiple of 16 (16-byte rows: cp.async chunks, TMA's row stride; pad K with zeros)", k)
    expect(out_dtype in OUT_DTYPES, "out_dtype", "torch.bfloat16 or torch.float32", out_dtype)


def b_scale_kind(ws: torch.Tensor, n: int) -> str:
    """[.., ceil(N/128), kb] -> blk128; [.., N, kb] -> row (the same when N <= 1)."""
    return "blk128" if ws.shape[-2] == -(-n // 128) else "row"


@dataclass(slots=True)
class GemmPlan:
    """One GEMM call's launch, but for the pointers: what its signature fixes (built once per
    signature by the launchers, runtime/plans.py). spec None: nothing to launch (an empty
    output, or zeros when K == 0 or there are no groups). The wgmma kernel's A and B tensor
    maps (and the tma_store epilogue's out map) depend on the pointers too: kept per operand
    address (a layer calls with the same weights and the caching allocator's few recurring
    activation and output buffers). A tma_store plan keeps the registers variant of its spec
    for an output whose address TMA cannot take (a caller's misaligned `out`)."""

    engine: str
    out_shape: tuple
    device: torch.device
    b_scale_rows: int = 128                  # reference plans: 128 (blocks) or 1 (rows); kernel plans: ws rows
    spec: KernelSpec | None = None
    config: LaunchConfig | None = None
    params: Params | None = None             # every field but the pointers (and maps); copied per call
    zero: bool = False
    maps: dict | None = None                 # wgmma: (operand, address, shape) -> its map (_map)
    registers: tuple | None = None           # tma_store: (spec, config) of the registers epilogue

    @staticmethod
    def make(spec, grid, *, engine, m, n, k, b_scale_rows, groups=1, out_shape=None, device=None) -> "GemmPlan":
        params = Fp8GemmParams(m=m, n=n, k=k, k_blocks=-(-k // BLOCK_K), b_scale_rows=b_scale_rows, num_groups=groups)
        if isinstance(spec, Fp8GemmWgmmaSpec):
            params = Fp8GemmWsParams(g=params)
        config = LaunchConfig.make(grid=grid, block=spec.block_threads(), shared_mem=spec.smem_bytes())
        plan = GemmPlan(engine, out_shape, device, b_scale_rows, spec, config, params)
        if getattr(spec, "epilogue", None) == "tma_store":
            # the same tile and ring depth, which fit (the staging's bytes are not requested)
            regs = dataclasses.replace(spec, epilogue="registers", unsafe_store_reuse=False)
            plan.registers = regs, LaunchConfig.make(grid=grid, block=regs.block_threads(), shared_mem=regs.smem_bytes())
        return plan

    def tensor_maps(self, a, b) -> tuple:
        """A and B as [rows, K] e4m3 with boxes of 128 K x block_m / block_n rows, 128B swizzle."""
        return (self._map(a, "a (xq)", (BLOCK_K, self.spec.block_m), 128),
                self._map(b, "b (wq)", (BLOCK_K, self.spec.block_n), 128))

    def out_map(self, out):
        """tma_store: out as [rows, N] with the kernel's store box (Fp8GemmWgmmaSpec.store_box)."""
        box, swizzle = self.spec.store_box()
        return self._map(out, "out", box, swizzle)

    def _map(self, t, name: str, box: tuple, swizzle: int):
        """One tensor's map as [rows, last dim], kept per (address, shape) for the plan (the weights'
        address is fixed, activations and outputs cycle through a few of the caching allocator's
        blocks)."""
        maps = self.maps
        if maps is None:
            maps = self.maps = {}
        key = (name, t.data_ptr(), t.shape)
        found = maps.get(key)
        if found is None:
            k = t.shape[-1]
            expect(key[1] % 16 == 0, name, "a 16-byte aligned address (TMA)", hex(key[1]))
            expect(t.numel() // max(k, 1) < 2**31, name, "fewer than 2^31 rows (TMA coordinates are int32)",
                   t.numel() // max(k, 1))
            found = descriptor(encode_tiled(t.view(-1, k), box, swizzle=swizzle, engine=self.engine))
            if len(maps) >= 64:
                maps.clear()
            maps[key] = found
        return found

    def run(self, out, a, a_scale, b, b_scale, m_indices=None, masked_m=None) -> torch.Tensor:
        if self.spec is None:
            return out.zero_() if self.zero else out
        p = type(self.params).from_buffer_copy(self.params)
        g = p.g if isinstance(p, Fp8GemmWsParams) else p
        spec, config = self.spec, self.config
        if g is not p:
            p.a_map, p.b_map = self.tensor_maps(a, b)
            if self.registers is not None:  # tma_store, where TMA can store this out (else its registers twin)
                if fp8_gemm_config.tma_store_possible(out.shape[-1], out.element_size(), out.data_ptr()):
                    p.out_map = self.out_map(out)
                else:
                    spec, config = self.registers
        g.a, g.a_scale, g.b, g.b_scale, g.out = a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), out.data_ptr()
        tensors = (a, a_scale, b, b_scale, out)
        if m_indices is not None:
            g.m_indices, tensors = m_indices.data_ptr(), tensors + (m_indices,)
        if masked_m is not None:
            g.masked_m, tensors = masked_m.data_ptr(), tensors + (masked_m,)
        launch(spec, config, p, engine=self.engine, tensors=tensors)
        return out


def run_kernel(spec: Fp8GemmSpec, *, grid, a, a_scale, b, b_scale, out, m, n, k, groups=1, m_indices=None, masked_m=None,
               engine: str) -> None:
    """One launch of `spec` (tests launch chosen specs directly through this)."""
    GemmPlan.make(spec, grid, engine=engine, m=m, n=n, k=k, b_scale_rows=b_scale.shape[-2], groups=groups).run(
        out, a, a_scale, b, b_scale, m_indices, masked_m)


def validate_out(out, shape: tuple, out_dtype, device) -> None:
    expect(isinstance(out, torch.Tensor) and out.dtype == out_dtype, "out", f"a {out_dtype} tensor", getattr(out, "dtype", type(out).__name__))
    expect(tuple(out.shape) == shape and out.is_contiguous(), "out", f"a contiguous tensor of shape {shape}", f"shape {tuple(out.shape)}, strides {out.stride()}")
    expect(out.device == device, "out", f"a tensor on {device}", out.device)


def gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, out_dtype=torch.bfloat16, *,
         out: torch.Tensor | None = None, kernel: str | None = None, epilogue: str | None = None) -> torch.Tensor:
    """y [M, N] = (xq * xs) @ (wq * ws)^T with fp32 promotion per 128-wide K block.

    xq: [M, K] float8_e4m3fn, xs: [M, ceil(K/128)] fp32; wq: [N, K] float8_e4m3fn,
    ws: [ceil(N/128), ceil(K/128)] fp32 (weight blocks) or [N, ceil(K/128)] (1 x 128 groups).
    K % 16 == 0. out_dtype: bfloat16 or float32; `out` (optional): a preallocated [M, N].
    kernel: "wgmma" | "mma_sync" | None (by device: kernel_for).
    epilogue: the wgmma kernel's, "registers" | "tma_store" | None (the default,
    fp8_gemm_config.DEFAULT_EPILOGUE); tma_store runs as registers where TMA cannot store the
    output (choose_epilogue). For the benchmark's comparison; the traced op takes the default."""
    if torch.compiler.is_compiling():  # traced as one opaque node: ops/fp8_library.py
        expect(epilogue is None, "epilogue", "None under torch.compile (the traced op has the default epilogue)", epilogue)
        y = torch.ops.fmo.fp8_gemm(xq, xs, wq, ws, out_dtype, kernel)
        return y if out is None else out.copy_(y)
    plan = _plans.get(_plans.key(("dense", out_dtype, kernel, epilogue), (xq, xs, wq, ws)),
                      lambda: _dense_plan(xq, xs, wq, ws, out_dtype, kernel, epilogue))
    if out is not None:
        validate_out(out, plan.out_shape, out_dtype, xq.device)
    if plan.engine == "reference":
        y = reference.fp8_gemm(xq, xs, wq, ws, out_dtype, b_scale_rows=plan.b_scale_rows)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(*plan.out_shape, dtype=out_dtype, device=plan.device)  # varargs: faster than a tuple
    return plan.run(out, xq, xs, wq, ws)


_plans = PlanCache()


def _dense_plan(xq, xs, wq, ws, out_dtype, kernel, epilogue=None) -> GemmPlan:
    """Validation, engine and kernel choice of a dense GEMM: once per signature."""
    expect(_is_e4m3(xq) and xq.dim() == 2, "xq", "a 2-D float8_e4m3fn tensor [M, K]", f"{getattr(xq, 'dtype', type(xq))} {tuple(getattr(xq, 'shape', ()))}")
    expect(_is_e4m3(wq) and wq.dim() == 2, "wq", "a 2-D float8_e4m3fn tensor [N, K]", f"{getattr(wq, 'dtype', type(wq))} {tuple(getattr(wq, 'shape', ()))}")
    m, k = xq.shape
    n = wq.shape[0]
    validate_operand(xq, xs, "xq", "xs", (), m, k, (m,))
    validate_operand(wq, ws, "wq", "ws", (), n, k, (-(-n // 128), n))
    validate_common(k, out_dtype)
    engine = backends.engine_for(xq=xq, xs=xs, wq=wq, ws=ws)
    kind = b_scale_kind(ws, n)
    if engine == "reference" or m * n == 0 or k == 0:
        return GemmPlan(engine, (m, n), xq.device, B_SCALES[kind], zero=k == 0)
    spec, grid = select("dense", kernel or kernel_for(engine, xq.device), m, n, k, OUT_DTYPES[out_dtype], kind,
                        epilogue=epilogue)
    return GemmPlan.make(spec, grid, engine=engine, m=m, n=n, k=k, b_scale_rows=ws.shape[-2], out_shape=(m, n),
                         device=xq.device)
