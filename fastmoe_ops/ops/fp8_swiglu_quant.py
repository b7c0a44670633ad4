"""Launcher of the fused SwiGLU + per-token-group FP8 quantisation (csrc/quant/swiglu_quant.cuh).

h: [T, 2I] bf16 | fp16 | fp32, gate = h[:, :I], up = h[:, I:] (w13's row order in
   fastmoe_ops/nn/moe_experts.py), last dim contiguous (rows may be strided), I % group_size == 0
-> aq: [T, I] float8_e4m3fn contiguous, as: [T, I / group_size] fp32 contiguous,
   aq * as ~= silu(gate) * up, quantised exactly as quantize_per_token_group would quantise
   the kernel's fp32 product (csrc/quant/fp8_scale.cuh).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import backends
from ..errors import expect
from ..reference import fp8 as reference
from ..runtime.launch import LaunchConfig, launch
from ..runtime.plans import PlanCache
from ..runtime.spec import CUDA_TYPE, Params, register_op, vector_width
from .fp8_quant import BLOCK_THREADS, Fp8GroupQuantSpec, validate_eps

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class SwigluQuantParams(Params):
    cpp_name = "fmo::SwigluQuantParams"
    _fields_ = [
        ("h", ctypes.c_void_p),
        ("out_q", ctypes.c_void_p),
        ("out_s", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("inter", ctypes.c_int64),
        ("h_row_stride", ctypes.c_int64),
        ("groups", ctypes.c_int64),
        ("min_amax", ctypes.c_float),
        ("reserved", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class Fp8SwigluQuantSpec(Fp8GroupQuantSpec):
    """The per-token-group quantiser's spec (same fields and checks: dtype, group_size,
    vec_width, pow2_scale; same team of lanes per group) for the fused SwiGLU kernel."""

    op: ClassVar[str] = "fp8_swiglu_quant_token_group"
    header: ClassVar[str] = "csrc/quant/swiglu_quant.cuh"
    params: ClassVar[type[Params]] = SwigluQuantParams

    def device_call(self) -> str:
        return (f"fmo::swiglu_quant_token_group<{CUDA_TYPE[self.dtype]}, {self.group_size}, {self.vec_width}, "
                f"{'true' if self.pow2_scale else 'false'}, {BLOCK_THREADS}>(p)")


@register_op("fp8_swiglu_quant_token_group")
def standard_specs():
    """The variants of the expert MLP's shapes (16-byte aligned rows): bf16 GEMM outputs
    (DeepSeek-V3) and fp32 ones (fastmoe_ops.nn.moe_experts), group 128."""
    for dtype in ("bf16", "fp32"):
        for pow2 in (False, True):
            yield Fp8SwigluQuantSpec(dtype=dtype, group_size=128, vec_width=vector_width(dtype), pow2_scale=pow2)


def _validate(h, group_size, eps, pow2_scale) -> None:
    """Every refusal before any kernel runs, each naming the argument."""
    expect(isinstance(h, torch.Tensor), "h", "a torch.Tensor", lambda: type(h).__name__)
    expect(h.dim() == 2, "h", "a 2-D tensor [T, 2I] (gate | up)", lambda: f"shape {tuple(h.shape)}")
    expect(h.dtype in _DTYPES, "h", "dtype bfloat16, float16 or float32", h.dtype)
    expect(group_size.__class__ is int and 32 <= group_size <= 1024 and group_size & (group_size - 1) == 0,
           "group_size", "a power of two in [32, 1024]", group_size)
    t, cols = h.shape
    expect(cols % (2 * group_size) == 0, "h",
           f"[T, 2I] with I a multiple of group_size={group_size} (gate | up halves of whole groups)",
           lambda: f"shape {tuple(h.shape)}")
    expect(cols == 0 or h.stride(1) == 1, "h", "a contiguous last dimension (stride 1)", lambda: f"strides {h.stride()}")
    expect(t <= 1 or h.stride(0) >= cols, "h", "non-overlapping rows (stride(0) >= 2I)", lambda: f"strides {h.stride()}")
    validate_eps(eps)
    expect(pow2_scale.__class__ is bool, "pow2_scale", "a bool", lambda: type(pow2_scale).__name__)


@dataclass(slots=True)
class _Plan:
    """A call but for its pointers. spec None: nothing to launch (reference engine, empty)."""

    engine: str
    rows: int
    inter: int
    groups: int
    spec: Fp8SwigluQuantSpec | None = None
    config: LaunchConfig | None = None
    params: SwigluQuantParams | None = None   # every field but the three pointers

    def outputs(self, device):
        return (torch.empty(self.rows, self.inter, dtype=torch.float8_e4m3fn, device=device),
                torch.empty(self.rows, self.groups, dtype=torch.float32, device=device))

    def run(self, h, aq, as_) -> None:
        p = SwigluQuantParams.from_buffer_copy(self.params)
        p.h, p.out_q, p.out_s = h.data_ptr(), aq.data_ptr(), as_.data_ptr()
        launch(self.spec, self.config, p, engine=self.engine, tensors=(h, aq, as_))


def _build(h, group_size, pow2_scale, eps) -> _Plan:
    _validate(h, group_size, eps, pow2_scale)
    rows, inter = h.shape[0], h.shape[1] // 2
    plan = _Plan(backends.engine_for(h=h), rows, inter, inter // group_size)
    if plan.engine == "reference" or rows * plan.groups == 0:
        return plan
    vec = 16 // h.element_size()
    aligned = h.stride(0) % vec == 0 and h.data_ptr() % 16 == 0   # inter % vec == 0 by validation
    plan.spec = Fp8SwigluQuantSpec(dtype=_DTYPES[h.dtype], group_size=group_size, vec_width=vec if aligned else 1,
                                   pow2_scale=pow2_scale)
    per_block = BLOCK_THREADS // plan.spec.team()
    plan.config = LaunchConfig.make(grid=-(-(rows * plan.groups) // per_block), block=BLOCK_THREADS)
    plan.params = SwigluQuantParams(h=0, out_q=0, out_s=0, rows=rows, inter=inter, h_row_stride=h.stride(0),
                                    groups=plan.groups, min_amax=eps, reserved=0)
    return plan


_plans = PlanCache()


def _check_out(out, plan: _Plan, device) -> None:
    expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out), "out",
           "a pair of tensors (aq, as)", lambda: type(out).__name__)
    for name, t, shape, dtype in (("out[0] (aq)", out[0], (plan.rows, plan.inter), torch.float8_e4m3fn),
                                  ("out[1] (as)", out[1], (plan.rows, plan.groups), torch.float32)):
        expect(tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous() and t.device == device
               and t.data_ptr() % 16 == 0, name, f"a contiguous 16-byte aligned {dtype} tensor of shape {shape} on {device}",
               lambda t=t: f"{t.dtype} {tuple(t.shape)} strides {t.stride()} at {t.data_ptr() % 16} mod 16 on {t.device}")


def swiglu_quantize_per_token_group(h: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False,
                                    eps: float = 1e-12, out=None):
    """silu(gate) * up quantised to e4m3 per 1 x group_size group, in one pass over h.

    h: [T, 2I] bf16/fp16/fp32 (gate | up), I % group_size == 0 -> (aq [T, I] float8_e4m3fn,
    as [T, I/group_size] fp32); out: optional preallocated (aq, as). The product is computed
    in fp32 (expf within 2 ulp on CUDA), then quantised by the contract of
    csrc/quant/fp8_scale.cuh. Not differentiable (FP8 outputs carry no gradient): the expert
    MLP's backward recomputes silu(gate) * up from h (fastmoe_ops/nn/moe_experts.py)."""
    if torch.compiler.is_compiling() and out is None:   # one opaque node: ops/fp8_library.py
        return torch.ops.fmo.fp8_swiglu_quant_token_group(h, group_size, pow2_scale, eps)
    aligned = h.data_ptr() & 15 == 0 if h.__class__ is torch.Tensor else None
    key = _plans.key(("swiglu", group_size, group_size.__class__, pow2_scale, pow2_scale.__class__, eps, eps.__class__,
                      aligned), (h,)) if isinstance(h, torch.Tensor) else None
    plan = _plans.get(key, lambda: _build(h, group_size, pow2_scale, eps))
    if out is not None:
        _check_out(out, plan, h.device)
    if plan.engine == "reference":
        aq, as_ = reference.swiglu_quantize_per_token_group(h, group_size, pow2_scale=pow2_scale, eps=eps)
        if out is None:
            return aq, as_
        out[0].copy_(aq), out[1].copy_(as_)
        return tuple(out)
    aq, as_ = out if out is not None else plan.outputs(h.device)
    if plan.spec is not None:
        plan.run(h, aq, as_)
    return aq, as_
