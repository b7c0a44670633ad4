"""Launcher of the MoE bucket layout kernel (csrc/moe/layout.cuh).

topk_idx: [T, k] int64 in [-1, B * experts_per_bucket), contiguous
-> counts: [B] int64, pos: [T, B] int64 (once) or [T, k] int64 (per slot).
Dispatch uses buckets = ranks (once: a token goes to a rank once); permute and
tokens_per_expert use buckets = local experts (per (token, slot) pair).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UnsupportedError, expect
from ..runtime.launch import LaunchConfig, launch
from ..runtime.spec import KernelSpec, Params, register_op

BLOCK_THREADS = 256


class MoeLayoutParams(Params):
    cpp_name = "fmo::MoeLayoutParams"
    _fields_ = [
        ("topk_idx", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("pos", ctypes.c_void_p),
        ("tokens", ctypes.c_int64),
        ("topk", ctypes.c_int64),
        ("num_buckets", ctypes.c_int64),
        ("experts_per_bucket", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class MoeLayoutSpec(KernelSpec):
    once: bool            # count a token once per bucket (ranks) or once per slot (experts)

    op: ClassVar[str] = "moe_bucket_layout"
    header: ClassVar[str] = "csrc/moe/layout.cuh"
    params: ClassVar[type[Params]] = MoeLayoutParams

    def check(self) -> None:
        super().check()
        if not isinstance(self.once, bool):
            raise UnsupportedError(f"{self.op}: once must be a bool, got {self.once!r}")

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def device_call(self) -> str:
        return f"fmo::moe_bucket_layout<{'true' if self.once else 'false'}, {BLOCK_THREADS}>(p)"


@register_op("moe_bucket_layout")
def standard_specs():
    yield MoeLayoutSpec(once=True)
    yield MoeLayoutSpec(once=False)


def bucket_layout(topk_idx: torch.Tensor, num_buckets: int, experts_per_bucket: int, once: bool, *, engine: str,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Counts and positions per bucket (see the module docstring); engine 'cuda' or 'sim'.
    The caller has checked the ids' range (they come validated from dispatch/permute).
    `out` = (counts, pos), contiguous int64 of the output shapes, is written in place."""
    expect(topk_idx.dtype == torch.int64 and topk_idx.dim() == 2, "topk_idx", "a 2-D int64 tensor",
           f"{topk_idx.dtype} of shape {tuple(topk_idx.shape)}")
    expect(isinstance(num_buckets, int) and 1 <= num_buckets <= 2**31 - 1, "num_buckets", "an int in [1, 2^31)", num_buckets)
    idx = topk_idx.contiguous()
    t, k = idx.shape
    shapes = ((num_buckets,), (t, num_buckets if once else k))
    if out is None:
        out = tuple(torch.empty(s, dtype=torch.int64, device=idx.device) for s in shapes)
    counts, pos = out
    for name, tensor, shape in zip(("out[0] (counts)", "out[1] (pos)"), out, shapes):
        expect(tensor.shape == shape and tensor.dtype == torch.int64 and tensor.is_contiguous(), name,
               f"a contiguous int64 tensor of shape {shape}", f"{tensor.dtype} {tuple(tensor.shape)}")
    params = MoeLayoutParams(topk_idx=idx.data_ptr(), counts=counts.data_ptr(), pos=pos.data_ptr(), tokens=t, topk=k,
                             num_buckets=num_buckets, experts_per_bucket=experts_per_bucket)
    config = LaunchConfig.make(grid=num_buckets, block=BLOCK_THREADS, shared_mem=BLOCK_THREADS // 32 * 8)
    launch(MoeLayoutSpec(once=once), config, params,
           engine=engine, tensors=(idx, counts, pos))
    return counts, pos
