"""Launcher of the sm_90a attention forward (csrc/attention/hopper_fwd.cuh: TMA + mbarrier ring,
a producer warp, consumer warpgroups of wgmma) and the one function that chooses between it and
the mma.sync kernel (csrc/attention/fwd.cuh).

Same inputs, outputs, lse contract and refusals as the mma.sync forward: validation, Problem and
the output shapes are attention.py's. What this kernel adds are three TMA tensor maps per call
(q, k, v viewed as [B, S, H * D] dense or [1, total, H * D] varlen; boxes of 64 columns x the
tile's rows, 128-byte swizzle), encoded for the call's engine (the driver on CUDA, the
simulator's encoder on the CPU) because they hold the tensors' addresses. With GQA packing
(pack_gqa_heads) q is mapped as [rows, Hq, D] instead, boxes of (64 columns, G heads, BM / G
positions): one work tile holds the G query heads that share a KV head, so K/V load once for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import sm_budget
from ..errors import UnsupportedError, expect
from ..runtime.launch import MAX_DYNAMIC_SMEM, LaunchConfig, launch
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, register_op
from ..runtime.tensor_map import TMA_DESCRIPTOR, aligned_fields, descriptor, encode_tiled
from .attention import AttnParams

PANEL = 64  # columns per TMA box: one 128-byte swizzled row of 16-bit elements
# (Dqk, Dv) -> (consumer warpgroups, block_n, stages). Two consumer warpgroups (BM = 128) share
# each K/V tile; BN = 128 keeps S (64) + O (32 or 64) + P (32) fp32/packed registers per consumer
# thread under setmaxnreg's 240; two stages: one tile computed while the next lands. MLA prefill
# (192, 128): O as D 128, Q and K one panel wider (208 KB of shared memory with two stages).
# D 256: O alone is 64 x 256 fp32 = 128 registers per consumer thread, so S narrows to BN = 64
# (32 registers, P 16): 176 + softmax state and addresses under 240; shared memory 64 KB of Q +
# 2 x 64 KB of K/V stages = 192 KB (BN 128 would need 256 KB for two stages).
TILES = {(64, 64): (2, 128, 2), (128, 128): (2, 128, 2), (192, 128): (2, 128, 2), (256, 256): (2, 64, 2)}
HEAD_DIM_PAIRS = tuple(TILES)


def head_dims_tag(head_dim: int, head_dim_v: int) -> str:
    """The head dims in an sm_90a attention entry name: d128, or d192v128 where they differ."""
    return f"d{head_dim}" + (f"v{head_dim_v}" if head_dim_v != head_dim else "")


def check_sm90_spec(spec: KernelSpec, head_dim_pairs) -> None:
    """The refusals the sm_90a attention specs (forward and backward) share: dtype, head dims
    among the kernel's tiles, and a 2-4 stage ring that fits shared memory."""
    def refuse(msg):
        raise UnsupportedError(f"{spec.op} {spec}: {msg}")
    if spec.dtype not in ("bf16", "fp16"):
        refuse("dtype must be bf16 or fp16")
    if (spec.head_dim, spec.head_dim_v) not in head_dim_pairs:
        refuse(f"(head_dim, head_dim_v) must be one of {head_dim_pairs}")
    if not 2 <= spec.stages <= 4 or spec.smem_bytes() > MAX_DYNAMIC_SMEM:
        refuse(f"stages must be 2..4 and fit {MAX_DYNAMIC_SMEM} bytes of shared memory")


class AttnHopperParams(Params):
    """Mirror of fmo::AttnHopperParams: the mma.sync kernel's fields, then q's, k's and v's maps."""
    cpp_name = "fmo::AttnHopperParams"
    _fields_ = aligned_fields([("a", AttnParams), ("q_map", TMA_DESCRIPTOR), ("k_map", TMA_DESCRIPTOR),
                               ("v_map", TMA_DESCRIPTOR)])


@dataclass(frozen=True)
class AttnHopperSpec(KernelSpec):
    dtype: str         # bf16 | fp16
    head_dim: int      # Dqk
    head_dim_v: int    # Dv
    consumers: int     # consumer warpgroups (block_m = 64 x consumers)
    block_n: int       # keys per tile (a wgmma N)
    stages: int        # K/V ring depth
    causal: bool
    pack_gqa: bool = False  # a work tile: the query heads sharing a KV head (pack_gqa_heads' rule)
    unsafe_early_release: bool = False  # tests only: a pipeline bug the simulator must catch

    op: ClassVar[str] = "attn_fwd_sm90"
    header: ClassVar[str] = "csrc/attention/hopper_fwd.cuh"
    params: ClassVar[type[Params]] = AttnHopperParams
    archs: ClassVar[tuple[str, ...]] = ("sm_90a",)  # wgmma, TMA, setmaxnreg

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    def entry_name(self) -> str:
        """e.g. fmo_attn_fwd_sm90_bf16_d128_bm128_bn128_s2_causal."""
        d = head_dims_tag(self.head_dim, self.head_dim_v)
        return (f"fmo_{self.op}_{self.dtype}_{d}_bm{self.block_m}_bn{self.block_n}_s{self.stages}"
                + ("_causal" if self.causal else "") + ("_packgqa" if self.pack_gqa else "")
                + ("_unsafe_early_release" if self.unsafe_early_release else ""))

    def check(self) -> None:
        super().check()
        if self.consumers not in (1, 2):
            raise UnsupportedError(f"{self.op} {self}: consumers must be 1 or 2 warpgroups")
        if self.block_n not in (64, 128, 192, 256):
            raise UnsupportedError(f"{self.op} {self}: block_n must be a wgmma N of ptx/wgmma_bf16.cuh (64, 128, 192, 256)")
        check_sm90_spec(self, HEAD_DIM_PAIRS)

    def block_threads(self) -> int:
        return 128 * (1 + self.consumers)  # the producer warpgroup + the consumers

    def smem_bytes(self) -> int:  # mirrors HopperFwdShape::kSmemBytes
        bm, bn, dqk, dv = self.block_m, self.block_n, self.head_dim, self.head_dim_v
        return 2 * bm * dqk + self.stages * 2 * bn * (dqk + dv) + 8 * (3 * self.stages + 2)

    def device_call(self) -> str:
        """The kernel call, after a static_assert that smem_bytes() (the launch's request) is the
        kernel's own HopperFwdShape::kSmemBytes: a drift between the two cannot compile."""
        shape = f"fmo::attn::HopperFwdShape<{self.consumers}, {self.block_n}, {self.head_dim}, {self.head_dim_v}, {self.stages}>"
        return (f'static_assert({shape}::kSmemBytes == {self.smem_bytes()}, "{self.entry_name()}: the launcher\'s '
                f'shared memory size differs from the kernel\'s"); '
                f"fmo::attn::attn_fwd_hopper<{CUDA_TYPE[self.dtype]}, {self.consumers}, {self.block_n}, "
                f"{self.head_dim}, {self.head_dim_v}, {self.stages}, {'true' if self.causal else 'false'}, "
                f"{'true' if self.pack_gqa else 'false'}, {'true' if self.unsafe_early_release else 'false'}>(p)")


def choose_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, pack_gqa: bool = False) -> AttnHopperSpec:
    nc, bn, stages = TILES[(head_dim, head_dim_v)]
    return AttnHopperSpec(dtype=dtype, head_dim=head_dim, head_dim_v=head_dim_v, consumers=nc, block_n=bn,
                          stages=stages, causal=causal, pack_gqa=pack_gqa)


def pack_gqa_heads(seqlen_q: int, heads_q: int, heads_kv: int, block_m: int) -> bool:
    """Whether a work tile packs the G = Hq / Hkv query heads that share a KV head (rows
    (position, head in group)) instead of holding one query head's positions. Every work tile
    streams all the K/V tiles of its KV head, so K/V traffic is proportional to the number of
    work tiles: ceil(Sq G / BM) Hkv packed against ceil(Sq / BM) Hq unpacked. Packing wins when
    it makes fewer tiles, i.e. when Sq alone leaves a BM tile partly empty (decode: Sq 1..16,
    G 4..8: one packed tile instead of G); at a tie the unpacked tiles are kept (as many tiles,
    so as many SMs busy, and no per-row division). G must divide BM: a Q box holds BM / G whole
    positions of G heads. Varlen: seqlen_q is max_seqlen_q; shorter sequences' rows are masked."""
    group = heads_q // heads_kv
    if group == 1 or block_m % group:
        return False
    return -(-seqlen_q * group // block_m) < group * -(-seqlen_q // block_m)


@register_op("attn_fwd_sm90")
def standard_specs():
    """Every variant: {bf16, fp16} x (Dqk, Dv) x causal or not x GQA-packed or not."""
    for dtype in ("bf16", "fp16"):
        for dqk, dv in HEAD_DIM_PAIRS:
            for causal in (False, True):
                for pack_gqa in (False, True):
                    yield choose_spec(dtype, dqk, dv, causal, pack_gqa)


FORWARD_KERNELS = ("wgmma", "mma_sync")


def arch_of(engine: str, device: torch.device) -> str:
    """The architecture a kernel engine runs: the simulator models sm_90a (wgmma, TMA); a GPU's
    own, by its compute capability ('sm_90a' for 9.0, whose arch-specific features the kernels use)."""
    if engine == "sim":
        return "sm_90a"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def forward_kernel(arch: str, head_dim: int, head_dim_v: int, rows_k: int) -> str:
    """The forward kernel of a problem: 'wgmma' (hopper_fwd.cuh) on sm_90a for the head dims it has
    tiles for and at least one key row (a tensor map needs every dimension >= 1); 'mma_sync'
    (fwd.cuh) otherwise (sm_80/sm_89 and others, MLA's (192, 128), no keys). A pure function of
    the arch and the shapes: the same on every rank."""
    return "wgmma" if arch == "sm_90a" and (head_dim, head_dim_v) in TILES and rows_k > 0 else "mma_sync"


def _map(t: torch.Tensor, batch: int | None, box_rows: int, engine: str):
    """t [rows, H, D] as [B, S, H * D] (dense, batch B) or [1, total, H * D] (varlen), boxes of
    (64 columns, box_rows rows, 1)."""
    view = t.reshape(batch if batch is not None else 1, -1, t.shape[1] * t.shape[2])
    return descriptor(encode_tiled(view, (PANEL, box_rows, 1), swizzle=128, engine=engine))


@dataclass(slots=True)
class HopperForwardLaunch:
    """attention.ForwardLaunch's counterpart: the launch but for the pointers and the maps,
    which are made per call from the tensors. batch: the dense batch (None: varlen)."""

    out_shape: tuple
    lse_shape: tuple
    spec: AttnHopperSpec
    config: LaunchConfig
    params: AttnParams
    batch: int | None

    def run(self, q, k, v, engine: str, cu_q=None, cu_k=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v: [rows, H, D] contiguous and aligned (attention._rows) -> (out [rows_q, Hq, Dv], lse)."""
        out = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
        P = AttnHopperParams()
        P.a = AttnParams.from_buffer_copy(self.params)
        P.a.q, P.a.k, P.a.v, P.a.o, P.a.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()
        tensors = (q, k, v, out, lse)
        if cu_q is not None:
            P.a.cu_seqlens_q, P.a.cu_seqlens_k = cu_q.data_ptr(), cu_k.data_ptr()
            tensors += (cu_q, cu_k)
        if self.spec.pack_gqa:  # q [rows, Hq, D]: boxes of (64 columns, G heads, BM / G positions)
            group = q.shape[1] // k.shape[1]
            P.q_map = descriptor(encode_tiled(q, (PANEL, group, self.spec.block_m // group), swizzle=128, engine=engine))
        else:
            P.q_map = _map(q, self.batch, self.spec.block_m, engine)
        P.k_map = _map(k, self.batch, self.spec.block_n, engine)
        P.v_map = _map(v, self.batch, self.spec.block_n, engine)
        launch(self.spec, self.config, P, engine=engine, tensors=tensors)
        return out, lse


def persistent_grid(spec: AttnHopperSpec, pb, compute_sms: int | None = None) -> tuple:
    """min(work tiles, SM budget) CTAs (hopper_fwd.cuh: WorkTiles); a work tile is one query block
    of one (sequence, head), packed: BM / G positions of one (sequence, KV head). A pure function
    of the shapes and the budget."""
    sms = sm_budget(pb.q.device).compute_sms if compute_sms is None else compute_sms
    pack = pb.q.shape[1] // pb.k.shape[1] if spec.pack_gqa else 1
    tiles = -(-pb.seqlen_q // (spec.block_m // pack)) * (pb.q.shape[1] // pack) * pb.batch
    return (max(1, min(tiles, sms)), 1, 1)


def forward_launch(pb, out_shape: tuple, params: AttnParams, compute_sms: int | None = None,
                   pack_gqa: bool | None = None) -> HopperForwardLaunch:
    """pb: attention.Problem with at least one query and one key row. compute_sms: the SM budget
    (default: budget.sm_budget's). pack_gqa: None: pack_gqa_heads' choice (tests force either)."""
    hq, hkv = pb.q.shape[1], pb.k.shape[1]
    block_m = 64 * TILES[(pb.q.shape[2], pb.v.shape[2])][0]
    if pack_gqa is None:
        pack_gqa = pack_gqa_heads(pb.seqlen_q, hq, hkv, block_m)
    elif pack_gqa:
        expect(hq > hkv and block_m % (hq // hkv) == 0, "pack_gqa",
               f"False for {hq} query heads over {hkv} KV heads (packing needs Hq > Hkv and G = Hq / Hkv "
               f"dividing the {block_m}-row tile)", pack_gqa)
    spec = choose_spec(pb.dtype, pb.q.shape[2], pb.v.shape[2], pb.causal, pack_gqa)
    config = LaunchConfig.make(grid=persistent_grid(spec, pb, compute_sms), block=spec.block_threads(),
                               shared_mem=spec.smem_bytes())
    return HopperForwardLaunch(out_shape, pb.lse_shape, spec, config, params, None if pb.cu_q is not None else pb.batch)
