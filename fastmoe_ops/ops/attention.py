"""Launchers of the fused-attention kernels (csrc/attention/): forward, and the backward's
delta, dQ and dK/dV passes. Shapes:

dense   q: [B, Sq, Hq, D], k: [B, Sk, Hkv, D], v: [B, Sk, Hkv, D] -> out [B, Sq, Hq, D],
        lse [B, Hq, Sq] fp32 (natural log)
varlen  q: [total_q, Hq, D], k/v: [total_k, Hkv, D], cu_seqlens_q/k: [B + 1] int32
        -> out [total_q, Hq, D], lse [Hq, total_q] fp32
bf16 or fp16, Hq % Hkv == 0, (Dqk, Dv) in {(64, 64), (128, 128), (192, 128)} (the last is
MLA's prefill: v and out have Dv), and for the forward (256, 256) on sm_90a (FORWARD_HEAD_DIM_PAIRS),
last dim contiguous (other strides are made contiguous here). The kernels see both layouts as rows
of [rows, H, D].

Two forward kernels: the sm_90a one (csrc/attention/hopper_fwd.cuh, TMA + wgmma, warp-specialised;
its spec and maps in attention_hopper.py) and the mma.sync one (fwd.cuh) for other archs and the
head dims the first has no tiles for; attention_hopper.forward_kernel (a pure function of the
arch and the head dims) is the one place that chooses. Both take AttnParams and share the
validation and Problem. Two backwards likewise: the sm_90a one (attention_hopper_bwd.py) and the
mma.sync passes (delta, dQ, dK/dV; their specs here) elsewhere; attention_hopper_bwd.backward_kernel
chooses and its problem_backward (re-exported here as backward) launches either.
Dqk != Dv: the spec and every template carry head_dim and head_dim_v separately; a new pair is
one HEAD_DIM_PAIRS entry plus its TILES.
"""
from __future__ import annotations

import ctypes
import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import backends
from ..errors import UnsupportedError, expect
from ..reference import attention as reference
from ..runtime.launch import MAX_DYNAMIC_SMEM, LaunchConfig, Plan, launch
from ..runtime.plans import PlanCache
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, register_op

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
HEAD_DIMS = (64, 128)
# (Dqk, Dv) pairs: equal head dims, and MLA's prefill shape (q/k 192 = 128 nope + 64 rope, v 128).
HEAD_DIM_PAIRS = ((64, 64), (128, 128), (192, 128))
KERNELS = ("fwd", "bwd_delta", "bwd_dq", "bwd_dkdv")
DELTA_WARPS = 4


class AttnParams(Params):
    cpp_name = "fmo::AttnParams"
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("lse", ctypes.c_void_p), ("dout", ctypes.c_void_p), ("delta", ctypes.c_void_p),
        ("dq", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
        ("cu_seqlens_q", ctypes.c_void_p), ("cu_seqlens_k", ctypes.c_void_p),
        ("batch", ctypes.c_int64), ("seqlen_q", ctypes.c_int64), ("seqlen_k", ctypes.c_int64),
        ("rows_q", ctypes.c_int64), ("heads_q", ctypes.c_int64), ("heads_kv", ctypes.c_int64),
        ("q_row_stride", ctypes.c_int64), ("k_row_stride", ctypes.c_int64), ("v_row_stride", ctypes.c_int64),
        ("o_row_stride", ctypes.c_int64), ("lse_batch_stride", ctypes.c_int64), ("lse_head_stride", ctypes.c_int64),
        ("softmax_scale", ctypes.c_float), ("scale_log2", ctypes.c_float),
    ]


@dataclass(frozen=True)
class AttnSpec(KernelSpec):
    kernel: str        # fwd | bwd_delta | bwd_dq | bwd_dkdv
    dtype: str         # bf16 | fp16
    head_dim: int      # Dqk
    head_dim_v: int    # Dv
    block_m: int       # query rows per tile
    block_n: int       # key rows per tile
    causal: bool

    op: ClassVar[str] = "attn"
    header: ClassVar[str] = "csrc/attention/attention.cuh"
    params: ClassVar[type[Params]] = AttnParams

    def entry_name(self) -> str:
        """e.g. fmo_attn_fwd_bf16_d128_bm64_bn64_causal (d192v128 when Dqk != Dv)."""
        d = f"d{self.head_dim}" + (f"v{self.head_dim_v}" if self.head_dim_v != self.head_dim else "")
        if self.kernel == "bwd_delta":
            return f"fmo_attn_bwd_delta_{self.dtype}_d{self.head_dim_v}"
        return f"fmo_attn_{self.kernel}_{self.dtype}_{d}_bm{self.block_m}_bn{self.block_n}" + ("_causal" if self.causal else "")

    def check(self) -> None:
        super().check()
        def refuse(msg):
            raise UnsupportedError(f"{self.op} {self}: {msg}")
        if self.kernel not in KERNELS:
            refuse(f"kernel must be one of {KERNELS}")
        if self.dtype not in ("bf16", "fp16"):
            refuse("dtype must be bf16 or fp16")
        if (self.head_dim, self.head_dim_v) not in HEAD_DIM_PAIRS:
            refuse(f"(head_dim, head_dim_v) must be one of {HEAD_DIM_PAIRS}")
        if self.block_m % 16 or self.block_n % 16 or not 16 <= self.block_m <= 128 or not 16 <= self.block_n <= 128:
            refuse("block_m and block_n must be multiples of 16 in [16, 128]")
        if self.smem_bytes() > MAX_DYNAMIC_SMEM:
            refuse(f"needs {self.smem_bytes()} bytes of shared memory, more than {MAX_DYNAMIC_SMEM}")

    def block_threads(self) -> int:
        if self.kernel == "bwd_delta":
            return 32 * DELTA_WARPS
        return 32 * ((self.block_n if self.kernel == "bwd_dkdv" else self.block_m) // 16)

    def smem_bytes(self) -> int:  # mirrors FwdShape / BwdShape in csrc/attention
        bm, bn, dqk, dv = self.block_m, self.block_n, self.head_dim, self.head_dim_v
        if self.kernel == "fwd":
            return 2 * bm * dqk + 2 * 2 * bn * (dqk + dv)
        if self.kernel == "bwd_dq":
            return 2 * bm * (dqk + dv) + 2 * 2 * bn * (dqk + dv)
        if self.kernel == "bwd_dkdv":
            return 2 * bn * (dqk + dv) + 2 * (2 * bm * (dqk + dv) + 8 * bm)
        return 0

    def device_call(self) -> str:
        t = CUDA_TYPE[self.dtype]
        if self.kernel == "bwd_delta":
            return f"fmo::attn::attn_bwd_delta<{t}, {self.head_dim_v}, {DELTA_WARPS}>(p)"
        return (f"fmo::attn::attn_{self.kernel}<{t}, {self.block_m}, {self.block_n}, {self.head_dim}, "
                f"{self.head_dim_v}, {'true' if self.causal else 'false'}>(p)")


# Tiles (block_m, block_n) per kernel and head dim: 4 warps of 16 rows each. The dK/dV
# kernel keeps dK and dV (2 x 16 x D fp32 per warp) in registers, so at D = 128 it walks
# 32-query tiles to stay under 255 registers without spills.
TILES = {
    ("fwd", 64): (64, 64), ("fwd", 128): (64, 64),
    ("bwd_dq", 64): (64, 64), ("bwd_dq", 128): (64, 64),
    ("bwd_dkdv", 64): (64, 64), ("bwd_dkdv", 128): (32, 64),
    ("bwd_delta", 64): (16, 16), ("bwd_delta", 128): (16, 16),
    # MLA prefill (Dqk 192, Dv 128): dK (16 x 192) and dV (16 x 128) per warp in registers.
    ("fwd", 192): (64, 64), ("bwd_dq", 192): (64, 32), ("bwd_dkdv", 192): (16, 64), ("bwd_delta", 192): (16, 16),
}


def choose_spec(kernel: str, dtype: str, head_dim: int, head_dim_v: int, causal: bool) -> AttnSpec:
    """Pure function of (kernel, dtype, head dims, causal): identical on every rank."""
    bm, bn = TILES[(kernel, head_dim)]
    if kernel == "bwd_delta":  # rowsum(dout * o) depends on Dv only: one variant per Dv
        head_dim = head_dim_v
    return AttnSpec(kernel=kernel, dtype=dtype, head_dim=head_dim, head_dim_v=head_dim_v, block_m=bm, block_n=bn,
                    causal=causal and kernel != "bwd_delta")


@register_op("attn")
def standard_specs():
    """Every variant: 4 kernels x {bf16, fp16} x (Dqk, Dv) x causal or not."""
    seen = set()
    for kernel in KERNELS:
        for dtype in ("bf16", "fp16"):
            for dqk, dv in HEAD_DIM_PAIRS:
                for causal in (False, True):
                    seen.add(choose_spec(kernel, dtype, dqk, dv, causal))
    yield from sorted(seen, key=lambda s: s.entry_name())


# --------------------------------------------------------------------------- validation


def _dtype_name(t) -> str:
    return str(getattr(t, "dtype", type(t).__name__))


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on `t`'s device now. Varlen's offset check then
    skips its host read (illegal during capture); the offsets must be valid prefix sums, as
    max_seqlen must bound them: the graph replays whatever the captured call saw."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# Offsets tensors read before: id -> (weak reference, version, last offset, longest sequence).
# Every layer of a model attends with the same cu_seqlens: one host read (a device sync on a
# GPU) per batch instead of one per layer. A hit needs the very tensor object, alive, with
# its version counter unchanged (any in-place write through torch bumps it, views included);
# a new tensor at a freed one's address is another object and is read again.
_offsets_read: dict[int, tuple] = {}


def _offsets_summary(cu: torch.Tensor, name: str) -> tuple[int, int]:
    """(last offset, longest sequence) of a checked prefix sum; reads it on the host unless
    this tensor, unchanged, was read before. Refuses offsets that do not start at 0 or that
    decrease (a bad prefix sum would make the kernels read out of bounds)."""
    seen = _offsets_read.get(id(cu))
    if seen is not None and seen[0]() is cu and seen[1] == cu._version:
        return seen[2], seen[3]
    c = cu.tolist()   # one small device-to-host copy
    expect(c[0] == 0 and all(a <= b for a, b in zip(c, c[1:])), name,
           "non-decreasing offsets starting at 0", c if len(c) <= 16 else f"{c[:16]}...")
    summary = (c[-1], max(b - a for a, b in zip(c, c[1:])))
    if len(_offsets_read) >= 1024:
        _offsets_read.clear()
    _offsets_read[id(cu)] = (weakref.ref(cu), cu._version, *summary)
    return summary


def validate(q, k, v, *, varlen: bool, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
             softmax_scale=None) -> None:
    """Refuse bad input before any launch, naming the argument, the expectation and what came."""
    dims = 3 if varlen else 4
    layout = "[total, H, D]" if varlen else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect(isinstance(t, torch.Tensor), name, "a torch.Tensor", lambda: type(t).__name__)
        expect(t.dim() == dims, name, f"a {dims}-D tensor {layout}", lambda: f"shape {tuple(t.shape)}")
        expect(t.dtype in DTYPES, name, "dtype bfloat16 or float16", t.dtype)
        expect(t.dtype == q.dtype, name, f"the dtype of q ({q.dtype})", t.dtype)
        expect(t.device == q.device, name, f"a tensor on {q.device} (like q)", t.device)
        expect(t.shape[-1] == 0 or t.stride(-1) == 1, name, "a contiguous last dimension (stride 1)", lambda: f"strides {t.stride()}")
    hq, hkv = q.shape[-2], k.shape[-2]
    expect(v.shape[-2] == hkv, "v", f"{hkv} heads (like k)", v.shape[-2])
    expect(hkv > 0 and hq > 0 and hq % hkv == 0, "q", f"a positive number of heads divisible by k's {hkv} (GQA/MQA)", hq)
    expect(v.shape[:-2] == k.shape[:-2], "v", f"leading dims {tuple(k.shape[:-2])} (like k)", tuple(v.shape[:-2]))
    if not varlen:
        expect(k.shape[0] == q.shape[0], "k", f"batch {q.shape[0]} (like q)", k.shape[0])
    d = q.shape[-1]
    expect(d in FORWARD_HEAD_DIMS, "q", "head dim in (64, 128, 256) or 192 (with v's 128: MLA; 256: the forward "
           "on sm_90a only)", d)
    expect(k.shape[-1] == d, "k", f"head dim {d} (like q)", k.shape[-1])
    pairs = [dv for dqk, dv in FORWARD_HEAD_DIM_PAIRS if dqk == d]
    expect(v.shape[-1] in pairs, "v", f"head dim {' or '.join(map(str, pairs))} (with q/k's {d})", v.shape[-1])
    if softmax_scale is not None:
        expect(isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale), "softmax_scale",
               "a finite float", softmax_scale)
    if varlen:
        for name, cu, total, mx in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            expect(isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 and cu.dim() == 1 and cu.numel() >= 2,
                   name, "a 1-D int32 tensor [B + 1]", lambda: f"{_dtype_name(cu)} {tuple(getattr(cu, 'shape', ()))}")
            expect(cu.device == q.device, name, f"a tensor on {q.device}", cu.device)
            _check_offsets(name, cu, total, mx)
            expect(isinstance(mx, int), name.replace("cu_seqlens", "max_seqlen"), "an int >= the longest sequence", mx)
        expect(cu_seqlens_k.numel() == cu_seqlens_q.numel(), "cu_seqlens_k", f"{cu_seqlens_q.numel()} offsets (like cu_seqlens_q)",
               cu_seqlens_k.numel())


def check_backward_head_dims(q, v, engine: str, when: str) -> None:
    """The backward kernels have tiles for HEAD_DIM_PAIRS only (no D 256): others are refused on a
    kernel engine before any launch (`when`: why a backward is due); the reference engine has all."""
    dims = (q.shape[-1], v.shape[-1])
    if engine != "reference" and dims not in HEAD_DIM_PAIRS:  # (the message formatted only then: per call)
        expect(False, "q", f"head dims (q, v) among {HEAD_DIM_PAIRS} for the backward (the backward kernels "
               f"have no tiles for others)", f"{dims} {when}")


def check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """The varlen checks on the offsets' values (data: no signature covers them), run on every
    call; a host read only when an offsets tensor is new or was written (_offsets_summary)."""
    _check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)


def _check_offsets(name: str, cu: torch.Tensor, total: int, mx) -> None:
    """cu: a prefix sum ending at its packed tensor's rows `total`, its longest sequence <= mx."""
    if capturing(cu):
        return  # a host read is illegal in a CUDA graph: the caller vouches for the offsets there
    last, longest = _offsets_summary(cu, name)
    expect(last == total, name, f"last offset {total} (rows of the packed tensor)", last)
    expect(isinstance(mx, int) and mx >= longest, name.replace("cu_seqlens", "max_seqlen"),
           f"an int >= the longest sequence ({longest})", mx)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H, D] -> a contiguous, 16-byte aligned [rows, H, D] (a view when it already is)."""
    t = t.reshape(-1, t.shape[-2], t.shape[-1])
    if not t.is_contiguous() or t.data_ptr() % 16:  # cp.async moves 16-byte chunks
        t = t.clone(memory_format=torch.contiguous_format)
    return t


@dataclass
class Problem:
    """Everything the launches share, resolved once per call."""

    q: torch.Tensor          # [rows_q, Hq, D]
    k: torch.Tensor          # [rows_k, Hkv, D]
    v: torch.Tensor
    cu_q: torch.Tensor | None
    cu_k: torch.Tensor | None
    batch: int
    seqlen_q: int            # dense Sq or max_seqlen_q
    seqlen_k: int
    causal: bool
    scale: float
    lse_shape: tuple

    @property
    def dtype(self) -> str:
        return DTYPES[self.q.dtype]

    def params(self, **ptrs) -> AttnParams:
        hq, d = self.q.shape[1], self.q.shape[2]
        varlen = self.cu_q is not None
        p = AttnParams(
            q=self.q.data_ptr(), k=self.k.data_ptr(), v=self.v.data_ptr(),
            cu_seqlens_q=self.cu_q.data_ptr() if varlen else 0, cu_seqlens_k=self.cu_k.data_ptr() if varlen else 0,
            batch=self.batch, seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, rows_q=self.q.shape[0],
            heads_q=hq, heads_kv=self.k.shape[1], q_row_stride=hq * d, k_row_stride=self.k.shape[1] * d,
            v_row_stride=self.v.shape[1] * self.v.shape[2], o_row_stride=hq * self.v.shape[2],
            lse_batch_stride=0 if varlen else hq * self.seqlen_q,
            lse_head_stride=self.q.shape[0] if varlen else self.seqlen_q,
            softmax_scale=self.scale, scale_log2=self.scale * math.log2(math.e),
        )
        for name, t in ptrs.items():
            setattr(p, name, t.data_ptr())
        return p

    def plan(self, kernel: str, grid, tensors, **ptrs) -> Plan:
        spec = choose_spec(kernel, self.dtype, self.q.shape[2], self.v.shape[2], self.causal)
        config = LaunchConfig.make(grid=grid, block=spec.block_threads(), shared_mem=spec.smem_bytes())
        cu = tuple(t for t in (self.cu_q, self.cu_k) if t is not None)
        return Plan(spec, config, self.params(**ptrs), (self.q, self.k, self.v, *cu, *tensors))


def problem(q, k, v, *, causal, softmax_scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
            max_seqlen_k=None) -> Problem:
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    hq = q.shape[-2]
    if cu_seqlens_q is None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        return Problem(_rows(q), _rows(k), _rows(v), None, None, b, sq, sk, causal, scale, (b, hq, sq))
    return Problem(_rows(q), _rows(k), _rows(v), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                   cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k), causal, scale, (hq, q.shape[0]))


def _grid(n: int, block: int) -> int:
    return -(-n // block)


@dataclass(slots=True)
class ForwardLaunch:
    """The forward's launch but for the pointers: what the problem's shapes, causal and scale
    fix (dense calls keep one per signature). spec None: nothing to launch."""

    out_shape: tuple
    lse_shape: tuple
    spec: AttnSpec | None = None
    config: LaunchConfig | None = None
    params: AttnParams | None = None   # pointers are overwritten per call

    def run(self, q, k, v, engine: str, cu_q=None, cu_k=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v: [rows, H, D] contiguous and aligned (_rows) -> (out [rows_q, Hq, Dv], lse)."""
        # sizes as varargs: torch parses them ~0.7 us faster than one tuple argument
        out = torch.empty(*self.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(*self.lse_shape, dtype=torch.float32, device=q.device)
        if self.spec is None:
            return out, lse
        p = AttnParams.from_buffer_copy(self.params)
        p.q, p.k, p.v, p.o, p.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()
        tensors = (q, k, v, out, lse)
        if cu_q is not None:
            p.cu_seqlens_q, p.cu_seqlens_k = cu_q.data_ptr(), cu_k.data_ptr()
            tensors += (cu_q, cu_k)
        launch(self.spec, self.config, p, engine=engine, tensors=tensors)
        return out, lse


def forward_launch(pb: Problem, kernel: str | None = None):
    """The forward's launch (ForwardLaunch, or attention_hopper.HopperForwardLaunch: same run()).
    kernel: 'wgmma' or 'mma_sync' (tests); None: attention_hopper.forward_kernel's choice."""
    hq = pb.q.shape[1]
    out_shape = (pb.q.shape[0], hq, pb.v.shape[2])
    if pb.q.shape[0] * hq * pb.v.shape[2] == 0 or pb.batch == 0 or pb.seqlen_q == 0:
        return ForwardLaunch(out_shape, pb.lse_shape)
    arch = "a forced choice"
    if kernel is None:
        engine = "cuda" if pb.q.is_cuda else "sim"  # a kernel engine: CPU tensors run on the simulator
        arch = hopper.arch_of(engine, pb.q.device)
        kernel = hopper.forward_kernel(arch, pb.q.shape[2], pb.v.shape[2], pb.k.shape[0])
    expect(kernel in hopper.FORWARD_KERNELS, "kernel", f"one of {hopper.FORWARD_KERNELS} (or None: by device)", kernel)
    if kernel == "wgmma":
        expect(hopper.forward_kernel("sm_90a", pb.q.shape[2], pb.v.shape[2], pb.k.shape[0]) == "wgmma", "kernel",
               f"'mma_sync' or None for head dims {(pb.q.shape[2], pb.v.shape[2])} with {pb.k.shape[0]} key rows "
               f"(the wgmma kernel has tiles for {hopper.HEAD_DIM_PAIRS} and needs keys)", kernel)
        return hopper.forward_launch(pb, out_shape, pb.params())
    dims = (pb.q.shape[2], pb.v.shape[2])
    expect(dims in HEAD_DIM_PAIRS, "q", f"head dims (q, v) among {HEAD_DIM_PAIRS}, the mma.sync forward's tiles "
           f"(others need the sm_90a forward and at least one key row)",
           lambda: f"{dims} for the mma.sync forward ({arch}, {pb.k.shape[0]} key rows)")
    bm = TILES[("fwd", pb.q.shape[2])][0]
    spec = choose_spec("fwd", pb.dtype, pb.q.shape[2], pb.v.shape[2], pb.causal)
    config = LaunchConfig.make(grid=(_grid(pb.seqlen_q, bm), hq, pb.batch), block=spec.block_threads(),
                               shared_mem=spec.smem_bytes())
    return ForwardLaunch(out_shape, pb.lse_shape, spec, config, pb.params())


def forward(pb: Problem, engine: str, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [rows_q, Hq, Dv], lse in pb.lse_shape) on a kernel engine; kernel as forward_launch."""
    return forward_launch(pb, kernel).run(pb.q, pb.k, pb.v, engine, pb.cu_q, pb.cu_k)


# ------------------------------------------------------------------------ entry points


_dense = PlanCache()   # dense forward signatures: False (reference engine) or their ForwardLaunch
_varlen = PlanCache()  # varlen forward signatures (max_seqlen_q/k among the options): the same
_SCALE_TYPES = (float, int, type(None))


def attention_forward(q, k, v, *, causal: bool, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=None, max_seqlen_k=None):
    """(out like q, lse fp32: dense [B, Hq, Sq], varlen [Hq, total_q]); validated here."""
    varlen = cu_seqlens_q is not None
    if not varlen:  # validation and the launch but for the pointers: once per signature
        key = _dense.key((causal, softmax_scale, softmax_scale.__class__), (q, k, v)) \
            if softmax_scale.__class__ in _SCALE_TYPES else None  # (a list would not hash: validate refuses it)
        fl = _dense.get(key, lambda: _dense_forward(q, k, v, causal, softmax_scale))
        if fl is not False:  # a kernel engine (the key's, when cached)
            out, lse = fl.run(_rows(q), _rows(k), _rows(v), "cuda" if q.is_cuda else backends.cpu_engine())
            return out.reshape(*q.shape[:-1], v.shape[-1]), lse
    else:  # the same, but the offsets are data: their values are checked every call
        key = _varlen.key((causal, softmax_scale, softmax_scale.__class__, max_seqlen_q, max_seqlen_q.__class__,
                           max_seqlen_k, max_seqlen_k.__class__), (q, k, v, cu_seqlens_q, cu_seqlens_k)) \
            if softmax_scale.__class__ in _SCALE_TYPES else None
        fl = _varlen.get(key, lambda: _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                      causal, softmax_scale))
        check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)  # a hit skipped validate's
        if fl is not False:
            return fl.run(_rows(q), _rows(k), _rows(v), "cuda" if q.is_cuda else backends.cpu_engine(),
                          cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous())
    engine = backends.engine_for(q=q, k=k, v=v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if engine == "reference":  # contiguous, as the kernels' outputs (and the fake impls) are
        if varlen:
            out, lse = reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=scale)
        else:
            out, lse = reference.attention(q, k, v, causal=causal, softmax_scale=scale)
        return out.contiguous(), lse.contiguous()
    pb = problem(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    out, lse = forward(pb, engine)
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse


def _dense_forward(q, k, v, causal, softmax_scale):
    """A dense signature's first call: validate; False on the reference engine, else the
    ForwardLaunch (everything validate checks, the kernel and its Params are functions of
    q, k, v's dtype, shape, strides and device, causal and softmax_scale; a NaN scale never
    equals itself, so it is refused every time)."""
    validate(q, k, v, varlen=False, softmax_scale=softmax_scale)
    if backends.engine_for(q=q, k=k, v=v) == "reference":
        return False
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return forward_launch(problem(q, k, v, causal=causal, softmax_scale=scale))


def _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    """A varlen signature's first call, as _dense_forward: everything but the offsets' values
    (checked per call: check_offsets) is a function of the key, max_seqlen_q/k included
    (they fix the grid and the Params)."""
    validate(q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale)
    if backends.engine_for(q=q, k=k, v=v) == "reference":
        return False
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return forward_launch(problem(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k))


def attention_backward(dout, q, k, v, out, lse, *, causal: bool, softmax_scale=None, cu_seqlens_q=None,
                       cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic: bool = False):
    """(dq, dk, dv) shaped like q, k, v; GQA: dk/dv summed over the query heads of a key head.
    deterministic: bit-for-bit reproducible dq (backward's; the reference engine always is)."""
    expect(isinstance(deterministic, bool), "deterministic", "a bool", deterministic)
    expect(isinstance(dout, torch.Tensor) and dout.shape == out.shape and dout.dtype == out.dtype, "dout",
           f"a {out.dtype} tensor of shape {tuple(out.shape)} (like out)",
           lambda: f"{_dtype_name(dout)} {tuple(getattr(dout, 'shape', ()))}")
    engine = backends.engine_for(q=q, k=k, v=v, dout=dout)
    check_backward_head_dims(q, v, engine, "in a backward")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if engine == "reference":
        grads = reference.attention_backward(dout, q, k, v, causal=causal, softmax_scale=scale,
                                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        return tuple(g.contiguous() for g in grads)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    pb = problem(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    dq, dk, dv = hopper_bwd.problem_backward(pb, dout, out, lse, engine, deterministic=deterministic)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


from . import attention_hopper as hopper  # noqa: E402  (it imports AttnParams from here)
from . import attention_hopper_bwd as hopper_bwd  # noqa: E402  (it imports this module)
from .attention_hopper_bwd import problem_backward as backward  # noqa: E402,F401  (the backward's routing)

# Every (Dqk, Dv) some forward kernel has tiles for: the mma.sync one's and the sm_90a one's (D 256).
FORWARD_HEAD_DIM_PAIRS = HEAD_DIM_PAIRS + tuple(pair for pair in hopper.HEAD_DIM_PAIRS if pair not in HEAD_DIM_PAIRS)
FORWARD_HEAD_DIMS = tuple(sorted({dqk for dqk, _ in FORWARD_HEAD_DIM_PAIRS}))
