"""Launcher of the sm_90a attention backward (csrc/attention/hopper_bwd.cuh: a producer warp
TMA-loading K/V once and streaming Q/dO tiles through an mbarrier ring, two consumer warpgroups of
wgmma (64 keys each: BN 128, consumer_warpgroups) accumulating dK/dV per key tile and adding dQ
into an fp32 buffer with red.global.add).

Inputs as attention.attention_backward's (dense [B, S, H, D] or varlen [total, H, D] with
cu_seqlens; lse [B, Hq, Sq] or [Hq, total_q] fp32 from the forward), outputs dq, dk, dv shaped like
q, k, v (GQA: dk, dv summed over the query heads of a KV head). The steps:
  delta = rowsum(dout * o)   the mma.sync backward's pre-pass (attention.py's "bwd_delta" spec)
  dq_accum = 0 (fp32 [rows_q, Hq, D]); the sm_90a kernel: dk, dv, dq_accum += scale dS K
  dq = dq_accum as the input dtype
dQ's fp32 sum runs in whatever order the CTAs' atomics land: not bit-for-bit reproducible, unless
deterministic=True (the key tiles add in key-tile order, through a semaphore per query tile; the
mma.sync backward is deterministic by its separate dQ pass). Head dims (64, 64), (128, 128) and
MLA's (192, 128) (dK's columns past DK_REG accumulate in shared memory: the kernel's register budget).
fmo.flash_attn's backward runs it where backward_kernel chooses it (sm_90a, the simulator too,
with at least one key row): problem_backward (attention.backward) routes the backward.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UnsupportedError, expect
from ..runtime.launch import LaunchConfig, launch
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, register_op
from ..runtime.tensor_map import TMA_DESCRIPTOR, aligned_fields, descriptor, encode_tiled
from . import attention
from .attention import AttnParams
from .attention_hopper import arch_of, check_sm90_spec, head_dims_tag

PANEL = 64  # columns per TMA box: one 128-byte swizzled row of 16-bit elements
BLOCK_M = 64  # query rows per ring stage
WARPGROUP_N = 64  # keys per consumer warpgroup (a wgmma's M); a CTA's BN = WARPGROUP_N x consumer_warpgroups
HEAD_DIM_PAIRS = ((64, 64), (128, 128), (192, 128))
DK_REG = 128  # dK columns accumulated in registers; the rest (MLA's 128..191) in shared memory, fp32
STAGES = 2  # Q/dO ring depth: one tile computed while the next lands
SMEM_LIMIT = 227 * 1024  # sm_90's dynamic shared memory per CTA


def smem_bytes(head_dim: int, head_dim_v: int, stages: int, warpgroups: int) -> int:
    """HopperBwdShape::kSmemBytes: K, V [BN rows], the Q/dO ring [BM rows]; per consumer warpgroup
    dS^T, dK's fp32 columns past DK_REG and lse + delta; the barriers."""
    bn = WARPGROUP_N * warpgroups
    return (2 * (bn * (head_dim + head_dim_v) + stages * BLOCK_M * (head_dim + head_dim_v))
            + warpgroups * (2 * WARPGROUP_N * BLOCK_M + 4 * WARPGROUP_N * (head_dim - min(head_dim, DK_REG))
                            + 2 * BLOCK_M * 4) + 8 * (1 + 2 * stages))


def consumer_warpgroups(head_dim: int, head_dim_v: int, stages: int = STAGES) -> int:
    """Consumer warpgroups per CTA (each owns 64 keys): 2 (BN 128: half the Q/dO loads and dQ adds per
    key; setmaxnreg gives each consumer thread 240 registers) where the shared memory fits and dK has no
    shared-memory panels, else 1 (255 registers at launch). MLA (192, 128) stays on one: its shared
    memory fits two (214056 bytes) but its registers do not (the causal deterministic variant spilled
    8 bytes at 240; the others 0). A pure function of the shapes."""
    if head_dim > DK_REG or smem_bytes(head_dim, head_dim_v, stages, 2) > SMEM_LIMIT:
        return 1
    return 2
BACKWARD_KERNELS = ("wgmma", "mma_sync")


def backward_kernel(arch: str, head_dim: int, head_dim_v: int, rows_k: int) -> str:
    """The backward kernel of a problem: 'wgmma' (hopper_bwd.cuh) on sm_90a for the head dims it has
    tiles for (MLA's (192, 128) included) and at least one key row (a tensor map needs every
    dimension >= 1); 'mma_sync' (attention.py's bwd_dq and bwd_dkdv passes) otherwise (sm_80/sm_89
    and others, no keys). A pure function of the arch and the shapes, as attention_hopper.forward_kernel: the
    same on every rank."""
    return "wgmma" if arch == "sm_90a" and (head_dim, head_dim_v) in HEAD_DIM_PAIRS and rows_k > 0 else "mma_sync"


def resolve_kernel(pb, engine: str, kernel: str | None) -> str:
    """attention.backward's kernel for pb (attention.Problem) on a kernel engine: None: backward_kernel's
    choice for the engine's arch; 'wgmma' or 'mma_sync' (tests force either) checked: the wgmma one
    only where backward_kernel would take it on sm_90a."""
    dims, rows_k = (pb.q.shape[2], pb.v.shape[2]), pb.k.shape[0]
    if kernel is None:
        return backward_kernel(arch_of(engine, pb.q.device), *dims, rows_k)
    expect(kernel in BACKWARD_KERNELS, "kernel", f"one of {BACKWARD_KERNELS} (or None: by device)", kernel)
    if kernel == "wgmma":
        expect(backward_kernel("sm_90a", *dims, rows_k) == "wgmma", "kernel",
               f"'mma_sync' or None for head dims {dims} with {rows_k} key rows (the wgmma backward has tiles "
               f"for {HEAD_DIM_PAIRS} and needs keys)", kernel)
    return kernel


def problem_backward(pb, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, engine: str,
                     kernel: str | None = None, deterministic: bool = False):
    """(dq, dk, dv) as [rows, H, D] on a kernel engine for pb (attention.Problem; attention.backward
    is this). kernel: 'wgmma' (backward_problem) or 'mma_sync' (attention.py's bwd_delta, then bwd_dq,
    then bwd_dkdv); None: backward_kernel's choice (tests force either). deterministic: the wgmma
    kernel's dQ adds in key-tile order (mma.sync: always)."""
    dout = attention._rows(dout)
    out = attention._rows(out)
    lse = lse.contiguous()
    if resolve_kernel(pb, engine, kernel) == "wgmma":
        return backward_problem(pb, dout, out, lse, engine, deterministic)
    dq = torch.empty_like(pb.q)
    dk = torch.empty_like(pb.k)
    dv = torch.empty_like(pb.v)
    hq, hkv, d = pb.q.shape[1], pb.k.shape[1], pb.q.shape[2]
    if pb.batch == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    grads = dict(o=out, lse=lse, dout=dout, delta=delta)
    tensors = (out, lse, dout, delta)
    if pb.q.shape[0] * hq > 0:
        pb.plan("bwd_delta", -(-pb.q.shape[0] * hq // attention.DELTA_WARPS), tensors, **grads).run(engine)
    if pb.q.shape[0] > 0 and pb.seqlen_q > 0:
        bm = attention.TILES[("bwd_dq", d)][0]
        pb.plan("bwd_dq", (-(-pb.seqlen_q // bm), hq, pb.batch), tensors + (dq,), dq=dq, **grads).run(engine)
    if pb.k.shape[0] > 0 and pb.seqlen_k > 0:
        bn = attention.TILES[("bwd_dkdv", d)][1]
        pb.plan("bwd_dkdv", (-(-pb.seqlen_k // bn), hkv, pb.batch), tensors + (dk, dv), dk=dk, dv=dv,
                **grads).run(engine)
    return dq, dk, dv


class AttnHopperBwdParams(Params):
    """Mirror of fmo::AttnHopperBwdParams."""
    cpp_name = "fmo::AttnHopperBwdParams"
    _fields_ = aligned_fields([("a", AttnParams), ("dq_accum", ctypes.c_void_p), ("dq_semaphore", ctypes.c_void_p),
                               ("q_map", TMA_DESCRIPTOR),
                               ("k_map", TMA_DESCRIPTOR), ("v_map", TMA_DESCRIPTOR), ("do_map", TMA_DESCRIPTOR)])


@dataclass(frozen=True)
class AttnHopperBwdSpec(KernelSpec):
    dtype: str       # bf16 | fp16
    head_dim: int    # Dqk
    head_dim_v: int  # Dv
    stages: int      # Q/dO ring depth
    causal: bool
    warpgroups: int = 1          # consumer warpgroups (64 keys each): consumer_warpgroups' choice
    deterministic: bool = False  # dQ's adds in key-tile order (reproducible; tiles wait on one another)
    reverse_grid: bool = False   # tests only: CTAs take the key tiles last to first (dQ's adds out of order)

    op: ClassVar[str] = "attn_bwd_sm90"
    header: ClassVar[str] = "csrc/attention/hopper_bwd.cuh"
    params: ClassVar[type[Params]] = AttnHopperBwdParams
    archs: ClassVar[tuple[str, ...]] = ("sm_90a",)  # wgmma, TMA

    def entry_name(self) -> str:
        """e.g. fmo_attn_bwd_sm90_bf16_d128_bm64_bn128_s2_causal."""
        d = head_dims_tag(self.head_dim, self.head_dim_v)
        return (f"fmo_{self.op}_{self.dtype}_{d}_bm{BLOCK_M}_bn{self.block_n()}_s{self.stages}"
                + ("_causal" if self.causal else "") + ("_deterministic" if self.deterministic else "")
                + ("_reverse_grid" if self.reverse_grid else ""))

    def check(self) -> None:
        super().check()
        check_sm90_spec(self, HEAD_DIM_PAIRS)
        if self.warpgroups not in (1, 2):
            raise UnsupportedError(f"{self.op} {self}: warpgroups must be 1 or 2 (64 consumer keys each)")
        if self.smem_bytes() > SMEM_LIMIT:
            raise UnsupportedError(f"{self.op} {self}: {self.smem_bytes()} bytes of shared memory with "
                                   f"{self.warpgroups} warpgroups, over {SMEM_LIMIT}")

    def block_n(self) -> int:
        return WARPGROUP_N * self.warpgroups  # keys per CTA

    def block_threads(self) -> int:
        return 128 * (1 + self.warpgroups)  # the producer warpgroup + the consumer warpgroups

    def smem_bytes(self) -> int:  # mirrors HopperBwdShape::kSmemBytes
        return smem_bytes(self.head_dim, self.head_dim_v, self.stages, self.warpgroups)

    def device_call(self) -> str:
        """The kernel call after a static_assert that smem_bytes() is the kernel's own size."""
        shape = f"fmo::attn::HopperBwdShape<{self.head_dim}, {self.head_dim_v}, {self.stages}, {self.warpgroups}>"
        return (f'static_assert({shape}::kSmemBytes == {self.smem_bytes()}, "{self.entry_name()}: the launcher\'s '
                f'shared memory size differs from the kernel\'s"); '
                f"fmo::attn::attn_bwd_hopper<{CUDA_TYPE[self.dtype]}, {self.head_dim}, {self.head_dim_v}, "
                f"{self.stages}, {self.warpgroups}, {'true' if self.causal else 'false'}, {'true' if self.deterministic else 'false'}, "
                f"{'true' if self.reverse_grid else 'false'}>(p)")


def choose_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, deterministic: bool = False,
                reverse_grid: bool = False) -> AttnHopperBwdSpec:
    return AttnHopperBwdSpec(dtype=dtype, head_dim=head_dim, head_dim_v=head_dim_v, stages=STAGES, causal=causal,
                             warpgroups=consumer_warpgroups(head_dim, head_dim_v), deterministic=deterministic,
                             reverse_grid=reverse_grid)


@register_op("attn_bwd_sm90")
def standard_specs():
    """Every variant: {bf16, fp16} x (Dqk, Dv) x causal or not x deterministic or not."""
    for dtype in ("bf16", "fp16"):
        for dqk, dv in HEAD_DIM_PAIRS:
            for causal in (False, True):
                for deterministic in (False, True):
                    yield choose_spec(dtype, dqk, dv, causal, deterministic)


def _map(t: torch.Tensor, batch: int | None, box_rows: int, engine: str):
    """t [rows, H, D] as [B, S, H * D] (dense) or [1, total, H * D] (varlen), boxes (64, box_rows, 1)."""
    view = t.reshape(batch if batch is not None else 1, -1, t.shape[1] * t.shape[2])
    return descriptor(encode_tiled(view, (PANEL, box_rows, 1), swizzle=128, engine=engine))


def _check_grads(q, o, lse, dout, pb) -> None:
    """o, dout like the forward's out; lse the forward's [B, Hq, Sq] / [Hq, total_q] fp32."""
    out_shape = (*q.shape[:-1], pb.v.shape[2])
    for name, t in (("o", o), ("dout", dout)):
        expect(isinstance(t, torch.Tensor) and tuple(t.shape) == out_shape and t.dtype == q.dtype
               and t.device == q.device, name, f"a {q.dtype} tensor of shape {out_shape} on {q.device} (the forward's out)",
               lambda: f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        expect(t.stride(-1) == 1, name, "a contiguous last dimension (stride 1)", lambda: f"strides {t.stride()}")
    expect(isinstance(lse, torch.Tensor) and tuple(lse.shape) == pb.lse_shape and lse.dtype == torch.float32
           and lse.device == q.device, "lse", f"a float32 tensor of shape {pb.lse_shape} on {q.device} (the forward's lse)",
           lambda: f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")


def backward(q, k, v, o, lse, dout, *, causal: bool, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q=None, max_seqlen_k=None, deterministic: bool = False, engine: str | None = None):
    """(dq, dk, dv) shaped like q, k, v on a kernel engine ('sim' or 'cuda'; None: by q's device).

    q: [B, Sq, Hq, D] (varlen [total_q, Hq, D]), k, v: [B, Sk, Hkv, D], o, dout like the forward's
    out, lse [B, Hq, Sq] (varlen [Hq, total_q]) fp32; D 64 or 128 (Dv = D), or MLA's q/k 192 with v
    128. deterministic: dQ's fp32 sums in a fixed order (bit-for-bit reproducible; the key tiles of
    a head then wait on one another)."""
    varlen = cu_seqlens_q is not None
    attention.validate(q, k, v, varlen=varlen, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale)
    pair = (q.shape[-1], v.shape[-1])
    expect(pair in HEAD_DIM_PAIRS, "q", f"(Dqk, Dv) in {HEAD_DIM_PAIRS} (the sm_90a backward's tiles)", pair)
    engine = engine or ("cuda" if q.is_cuda else "sim")
    expect(engine in ("sim", "cuda"), "engine", "'sim' or 'cuda'", engine)
    expect(isinstance(deterministic, bool), "deterministic", "a bool", deterministic)
    pb = attention.problem(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    _check_grads(q, o, lse, dout, pb)
    dq, dk, dv = backward_problem(pb, attention._rows(dout), attention._rows(o), lse.contiguous(), engine,
                                  deterministic)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def backward_problem(pb, dout, out, lse, engine: str, deterministic: bool = False):
    """pb: attention.Problem (validated; head dims in HEAD_DIM_PAIRS); dout, out [rows_q, Hq, Dv]
    contiguous, lse contiguous -> (dq, dk, dv) as [rows, H, D]: problem_backward's contract."""
    dq_accum, dk, dv = accumulate(pb, dout, out, lse, engine, deterministic)
    return dq_accum.to(pb.q.dtype), dk, dv  # dQ's fp32 sum to the output dtype (a torch cast)


def accumulate(pb, dout, out, lse, engine: str, deterministic: bool = False, reverse_grid: bool = False):
    """backward_problem's launches: (dq as its fp32 sum, dk, dv). reverse_grid: tests only
    (AttnHopperBwdSpec); the fp32 sum shows the order of the adds, which rounding to bf16 hides."""
    hq, hkv = pb.q.shape[1], pb.k.shape[1]
    dq_accum = torch.zeros(pb.q.shape, dtype=torch.float32, device=pb.q.device)
    dk = torch.empty_like(pb.k)
    dv = torch.empty_like(pb.v)
    if pb.batch == 0 or pb.k.shape[0] == 0 or pb.seqlen_k == 0 or pb.q.shape[0] == 0:
        return dq_accum, dk.zero_(), dv.zero_()  # no keys or no queries: every gradient 0
    delta = torch.empty_like(lse)
    grads = dict(o=out, lse=lse, dout=dout, delta=delta)
    tensors = (out, lse, dout, delta)
    # the mma.sync backward's delta pre-pass
    pb.plan("bwd_delta", -(-pb.q.shape[0] * hq // attention.DELTA_WARPS), tensors, **grads).run(engine)
    spec = choose_spec(pb.dtype, pb.q.shape[2], pb.v.shape[2], pb.causal, deterministic, reverse_grid)
    P = AttnHopperBwdParams()
    P.a = pb.params(dk=dk, dv=dv, **grads)
    P.dq_accum = dq_accum.data_ptr()
    tensors += (dq_accum, dk, dv)
    if deterministic:  # per (sequence, query head, query tile): how many key tiles have added their dQ
        semaphore = torch.zeros(pb.batch, hq, -(-pb.seqlen_q // BLOCK_M), dtype=torch.int32, device=pb.q.device)
        P.dq_semaphore = semaphore.data_ptr()
        tensors += (semaphore,)
    batch = None if pb.cu_q is not None else pb.batch
    P.q_map = _map(pb.q, batch, BLOCK_M, engine)
    P.do_map = _map(dout, batch, BLOCK_M, engine)
    P.k_map = _map(pb.k, batch, spec.block_n(), engine)
    P.v_map = _map(pb.v, batch, spec.block_n(), engine)
    config = LaunchConfig.make(grid=(-(-pb.seqlen_k // spec.block_n()), hkv, pb.batch), block=spec.block_threads(),
                               shared_mem=spec.smem_bytes())
    cu = tuple(t for t in (pb.cu_q, pb.cu_k) if t is not None)
    launch(spec, config, P, engine=engine, tensors=(pb.q, pb.k, pb.v, *cu, *tensors))
    return dq_accum, dk, dv
