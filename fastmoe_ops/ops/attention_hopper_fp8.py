"""Launcher of the sm_90a FP8 (e4m3) attention forward (csrc/attention/hopper_fwd_fp8.cuh: TMA +
mbarrier ring, a producer warp, three warps transposing V in shared memory, consumer warpgroups
of QGMMA). Validation and the public entry are attention_fp8.py's; this module only launches.

    q8: [B, Sq, Hq, D], k8 / v8: [B, Sk, Hkv, D] e4m3, D 64 or 128
    descale_q: [B, Hq], descale_k / descale_v: [B, Hkv] or [B, Hkv, ceil(Sk / 128)] fp32
    -> out [B, Sq, Hq, D] bf16, lse [B, Hq, Sq] fp32

Tensor maps: q, k, v as [B, S, H * D] (dense only), boxes of (D columns, tile rows, 1) with the
D-byte swizzle (one box row is one D-byte row of e4m3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ctypes

import torch

from ..errors import UnsupportedError
from ..runtime.launch import MAX_DYNAMIC_SMEM, LaunchConfig, launch
from ..runtime.spec import KernelSpec, Params, register_op
from ..runtime.tensor_map import TMA_DESCRIPTOR, aligned_fields, descriptor, encode_tiled
from .attention import AttnParams
from .attention import problem as attention_problem
from .attention_hopper import persistent_grid

HEAD_DIMS = (64, 128)  # one TMA box row of 64 / 128 bytes: the 64B / 128B swizzle
# D -> (consumer warpgroups, block_n, stages): BN 128 (Vt rows of 128 bytes); S 64 + O <= 64 fp32
# and P 16 packed registers per consumer thread, under setmaxnreg's 232.
TILES = {64: (2, 128, 2), 128: (2, 128, 2)}


class AttnFp8Params(Params):
    """Mirror of fmo::AttnFp8Params."""
    cpp_name = "fmo::AttnFp8Params"
    _fields_ = aligned_fields([("a", AttnParams), ("q_map", TMA_DESCRIPTOR), ("k_map", TMA_DESCRIPTOR),
                               ("v_map", TMA_DESCRIPTOR), ("descale_q", ctypes.c_void_p),
                               ("descale_k", ctypes.c_void_p), ("descale_v", ctypes.c_void_p),
                               ("k_scale_blocks", ctypes.c_int32), ("v_scale_blocks", ctypes.c_int32)])


@dataclass(frozen=True)
class AttnFp8Spec(KernelSpec):
    head_dim: int
    consumers: int
    block_n: int
    stages: int
    causal: bool
    broken_permutation: bool = False  # tests only: V^T without the key permutation P's registers need

    op: ClassVar[str] = "attn_fwd_fp8_sm90"
    header: ClassVar[str] = "csrc/attention/hopper_fwd_fp8.cuh"
    params: ClassVar[type[Params]] = AttnFp8Params
    archs: ClassVar[tuple[str, ...]] = ("sm_90a",)
    pack_gqa: ClassVar[bool] = False  # attention_hopper.persistent_grid's question: never packed here

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    def entry_name(self) -> str:
        """e.g. fmo_attn_fwd_fp8_sm90_e4m3_d128_bm128_bn128_s2_causal."""
        return (f"fmo_{self.op}_e4m3_d{self.head_dim}_bm{self.block_m}_bn{self.block_n}_s{self.stages}"
                + ("_causal" if self.causal else "") + ("_broken_permutation" if self.broken_permutation else ""))

    def check(self) -> None:
        super().check()
        def refuse(msg):
            raise UnsupportedError(f"{self.op} {self}: {msg}")
        if self.head_dim not in HEAD_DIMS:
            refuse(f"head_dim must be one of {HEAD_DIMS}")
        if self.consumers not in (1, 2):
            refuse("consumers must be 1 or 2 warpgroups")
        if self.block_n != 128:
            refuse("block_n must be 128 (Vt rows: one 128-byte swizzled row of keys)")
        if not 2 <= self.stages <= 4 or self.smem_bytes() > MAX_DYNAMIC_SMEM:
            refuse(f"stages must be 2..4 and fit {MAX_DYNAMIC_SMEM} bytes of shared memory")

    def block_threads(self) -> int:
        return 128 * (1 + self.consumers)

    def smem_bytes(self) -> int:  # mirrors HopperFp8Shape::kSmemBytes
        bm, bn, d = self.block_m, self.block_n, self.head_dim
        return bm * d + self.stages * 3 * bn * d + 8 * (4 * self.stages + 2)

    def device_call(self) -> str:
        shape = f"fmo::attn::HopperFp8Shape<{self.consumers}, {self.block_n}, {self.head_dim}, {self.stages}>"
        b = lambda x: "true" if x else "false"  # noqa: E731
        return (f'static_assert({shape}::kSmemBytes == {self.smem_bytes()}, "{self.entry_name()}: the launcher\'s '
                f'shared memory size differs from the kernel\'s"); '
                f"fmo::attn::attn_fwd_hopper_fp8<{self.consumers}, {self.block_n}, {self.head_dim}, {self.stages}, "
                f"{b(self.causal)}, {b(self.broken_permutation)}>(p)")


def choose_spec(head_dim: int, causal: bool, broken_permutation: bool = False) -> AttnFp8Spec:
    nc, bn, stages = TILES[head_dim]
    return AttnFp8Spec(head_dim=head_dim, consumers=nc, block_n=bn, stages=stages, causal=causal,
                       broken_permutation=broken_permutation)


@register_op("attn_fwd_fp8_sm90")
def standard_specs():
    """D 64 and 128, causal or not."""
    for d in HEAD_DIMS:
        for causal in (False, True):
            yield choose_spec(d, causal)


def forward(q, k, v, descale_q, descale_k, descale_v, *, causal: bool, softmax_scale, engine: str,
            compute_sms: int | None = None, broken_permutation: bool = False, out=None, lse=None):
    """The launch (attention_fp8.attention_forward_fp8 validated everything): (out [B, Sq, Hq, D] bf16,
    lse [B, Hq, Sq] fp32). out / lse: preallocated contiguous outputs (tests poison them), else new."""
    b, sq, hq, d = q.shape
    pb = attention_problem(q, k, v, causal=causal, softmax_scale=softmax_scale)
    out = torch.empty((b, sq, hq, d), dtype=torch.bfloat16, device=q.device) if out is None else out
    lse = torch.empty(pb.lse_shape, dtype=torch.float32, device=q.device) if lse is None else lse
    assert out.shape == (b, sq, hq, d) and out.is_contiguous() and lse.shape == pb.lse_shape and lse.is_contiguous()
    if b * sq == 0 or pb.k.shape[0] == 0:  # no work tile, or no key (a tensor map needs every dim >= 1)
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    spec = choose_spec(d, causal, broken_permutation)
    config = LaunchConfig.make(grid=persistent_grid(spec, pb, compute_sms), block=spec.block_threads(),
                               shared_mem=spec.smem_bytes())
    scales = [s.contiguous() for s in (descale_q, descale_k, descale_v)]
    P = AttnFp8Params()
    P.a = pb.params(o=out, lse=lse)
    for name, t, rows in (("q_map", pb.q, spec.block_m), ("k_map", pb.k, spec.block_n), ("v_map", pb.v, spec.block_n)):
        view = t.reshape(b, -1, t.shape[1] * t.shape[2])
        setattr(P, name, descriptor(encode_tiled(view, (d, rows, 1), swizzle=d, engine=engine)))
    P.descale_q, P.descale_k, P.descale_v = (s.data_ptr() for s in scales)
    P.k_scale_blocks, P.v_scale_blocks = (s.shape[2] if s.dim() == 3 else 1 for s in scales[1:])
    launch(spec, config, P, engine=engine, tensors=(pb.q, pb.k, pb.v, out, lse, *scales))
    return out, lse
